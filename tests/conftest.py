import os

# Tests run on the CPU, offline, even on a machine with a GPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megabridge.cli import quiet_expected_warnings  # noqa: E402

quiet_expected_warnings()
