"""Output folders (megabridge.outputs): one writer at a time, private staging, no clobbering.

Concurrency is real here: the other writer is a second Python process that holds the
output while this one tries to write it.
"""

import errno
import os
import signal
import subprocess
import sys

import pytest

from megabridge import outputs
from megabridge.errors import UserError
from tests.helpers import REPO, cpu_env

pytestmark = pytest.mark.unit


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def writer_process(out, text):
    """A second process that claims ``out``, writes into its staging folder, and waits for
    a line on stdin before publishing (or for a kill)."""
    script = (
        "import sys\n"
        "from megabridge import outputs\n"
        f"with outputs.output_folder({str(out)!r}) as tmp:\n"
        f"    (tmp / 'weights').write_text({text!r})\n"
        "    print('claimed', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=cpu_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "claimed"
    return child


def test_two_writers_of_one_path_exactly_one_succeeds_and_the_result_is_intact(tmp_path):
    out = tmp_path / "out"
    first = writer_process(out, "first writer")
    try:
        for overwrite in (False, True):  # --overwrite does not break another run's lock
            with pytest.raises(UserError) as err:
                with outputs.output_folder(out, overwrite=overwrite) as tmp:
                    (tmp / "weights").write_text("second writer")
            message = str(err.value)
            assert "is being written by another process" in message and "\n" not in message
    finally:
        first.communicate("publish\n", timeout=60)
    assert first.returncode == 0
    assert names(tmp_path) == ["out"]  # no staging folder or lock file left behind
    assert names(out) == ["weights"]
    assert (out / "weights").read_text() == "first writer"


def test_a_killed_writer_leaves_no_lock_and_its_staging_folder_is_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    killed = writer_process(out, "half")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".out.tmp-{killed.pid}-")
    with outputs.output_folder(out) as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        (tmp / "weights").write_text("rerun")
    assert names(tmp_path) == ["out"]
    assert (out / "weights").read_text() == "rerun"


def test_an_output_that_appears_meanwhile_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="appeared while this run was writing it"):
        with outputs.output_folder(out) as tmp:
            (tmp / "weights").write_text("mine")
            out.mkdir()  # another program, which ignores megabridge's lock
            (out / "theirs").write_text("theirs")
    assert names(tmp_path) == ["out"] and names(out) == ["theirs"]


def test_an_empty_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="appeared while"):
        with outputs.output_folder(out) as tmp:
            (tmp / "weights").write_text("mine")
            out.mkdir()  # os.rename would silently replace an empty folder
    assert names(out) == []
    with outputs.output_folder(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("mine")
    assert names(out) == ["weights"] and names(tmp_path) == ["out"]


def test_failure_inside_leaves_nothing_and_existing_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with outputs.output_folder(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("killed midway")
    assert names(tmp_path) == []
    out.mkdir()
    with pytest.raises(UserError, match="already exists .pass --overwrite"):
        with outputs.output_folder(out):
            pass
    with outputs.output_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert names(out) == ["new"] and names(tmp_path) == ["out"]


def test_dangling_symlink_read_only_and_overlapping_outputs_are_one_line(tmp_path, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=r"is a symlink to .*gone, which does not exist"):
        outputs.check_output(link, overwrite=True)
    src = tmp_path / "model"
    src.mkdir()
    for out in (src, src / "inner", tmp_path):
        with pytest.raises(UserError, match="overlaps the input .* would destroy the input"):
            outputs.check_output(out, overwrite=True, inputs=[src])
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)  # as root, chmod would not stop a write
    with pytest.raises(UserError) as err:
        with outputs.output_folder(tmp_path / "out"):
            pass
    assert str(err.value) == f"cannot write output {tmp_path / 'out'}: Read-only file system"
