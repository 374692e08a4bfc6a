"""The numbered examples run as documented."""

import pytest

from tests.helpers import REPO, cpu_env

pytestmark = pytest.mark.docs


def _run(args, tmp_path):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_example_0_convert_and_verify(tmp_path):
    result = _run(
        [
            str(REPO / "examples" / "0_convert_and_verify.py"),
            "--tiny",
            "--out",
            str(tmp_path / "back"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("max |logit diff| ")[1].split(",")[0])
    assert diff < 1e-4
    assert (tmp_path / "back" / "model.safetensors").is_file()


def test_example_1_pretrain(tmp_path):
    result = _run([str(REPO / "examples" / "1_pretrain_with_overrides.py"), "train.train_iters=3",
                   f"checkpoint.run_dir={tmp_path}"], tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done at iteration 3" in result.stdout


def test_readme_family_table_is_the_registry():
    from megabridge.catalog import markdown_table
    from megabridge.conversion.auto_bridge import AutoBridge

    readme = (REPO / "README.md").read_text()
    assert markdown_table(AutoBridge.list_supported()) in readme, (
        "regenerate: megabridge models --markdown"
    )
