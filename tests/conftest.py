import os

# Tests run on the CPU, offline, even on a machine with a GPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megabridge.cli import quiet_expected_warnings  # noqa: E402

quiet_expected_warnings()


import pytest  # noqa: E402

from tests.quick import QUICK, selects  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `-m quick` must see the marks
def pytest_collection_modifyitems(config, items):
    used = set()
    for item in items:
        for entry in QUICK:
            if selects(entry, item.nodeid):
                item.add_marker(pytest.mark.quick)
                used.add(entry)
    if "quick" in (config.getoption("markexpr") or ""):
        collected = {item.nodeid.split("::")[0] for item in items}
        stale = [e for e in QUICK if e not in used and e.split("::")[0] in collected]
        if stale:
            raise pytest.UsageError(f"tests/quick.py lists tests that do not exist: {stale}")
