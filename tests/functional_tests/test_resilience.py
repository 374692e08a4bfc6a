"""Preemption, crashes, NaNs, dead ranks and full disks lose nothing (issue 8).

Every run here is a fresh process (or torchrun group) on the CPU, killed, signalled
or faulted on purpose; faults come from the hooks at the end of training/step.py.
One uninterrupted run (the ``reference`` fixture) is what the others must reproduce.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megabridge.training import checkpointing
from tests.helpers import REPO, RUN_RECIPE, cpu_env, free_port, losses, read_metrics

pytestmark = pytest.mark.integration

RECIPE = "vanilla_gpt_pretrain_config"
ITERS, INTERVAL, GBS = 10, 4, 8
RUN = [
    f"train.train_iters={ITERS}",
    f"train.global_batch_size={GBS}",
    "train.micro_batch_size=4",
    "train.eval_interval=None",
    "scheduler.lr_warmup_iters=1",
    f"scheduler.lr_decay_iters={ITERS}",
    "logger.log_interval=1",
    "logger.tensorboard=false",
    f"checkpoint.save_interval={INTERVAL}",
]


class Live:
    """A training process whose output is read while it runs, to act at an iteration."""

    def __init__(self, args: list[str], nproc: int = 0, **env: str):
        if nproc:
            launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
            cmd = [*launcher, f"--master_port={free_port()}", str(RUN_RECIPE)]
        else:
            cmd = ["-m", "megabridge", "train"]
        self.proc = subprocess.Popen(
            [sys.executable, *cmd, "--recipe", RECIPE, *args],
            cwd=REPO,
            env=cpu_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, to kill it whole
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"ended before {text!r}:\n{self.output[-4000:]}"
            assert time.time() < deadline, f"no {text!r} in {timeout}s:\n{self.output[-4000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(10)
        return rc


def run(args: list[str], nproc: int = 0, timeout: float = 300, **env: str) -> tuple[int, str]:
    live = Live(args, nproc, **env)
    return live.finish(timeout), live.output


def train_ok(args: list[str], **env: str) -> str:
    rc, out = run(args, **env)
    assert rc == 0, out[-4000:]
    return out


def dirs(root: Path, name: str) -> list[str]:
    return [f"checkpoint.save={root / name}", f"logger.log_dir={root / (name + '_logs')}"]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("megabridge: error:")]


def assert_same_losses(got: dict, ref: dict, iterations, tol: float = 1e-5) -> None:
    assert sorted(got) == list(iterations), got
    for it in got:
        assert got[it] == pytest.approx(ref[it], abs=tol), (it, got[it], ref[it])


def checkpoint_tensors(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read offline (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and "_extra_state" not in k}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, float], Path]:
    """An uninterrupted run: its losses and its save folder (iter 4, 8 and 10)."""
    root = tmp_path_factory.mktemp("reference")
    train_ok([*RUN, *dirs(root, "ckpt")])
    return losses(root / "ckpt_logs"), root / "ckpt"


def test_second_identical_run_gives_bit_identical_losses(reference, tmp_path):
    ref, _ = reference
    train_ok([*RUN, *dirs(tmp_path, "again")])
    again = losses(tmp_path / "again_logs")
    assert sorted(ref) == list(range(1, ITERS + 1))
    assert again == ref  # exactly: same bits, not just close


def test_sigkill_between_checkpoints_then_resume_reproduces_losses(reference, tmp_path):
    ref, _ = reference
    live = Live([*RUN, *dirs(tmp_path, "ckpt")])
    live.wait_for(f"iteration 5/{ITERS}")  # after the checkpoint of 4, well before that of 8
    os.killpg(live.proc.pid, signal.SIGKILL)  # the whole node goes, writer processes too
    assert live.finish() == -signal.SIGKILL
    ckpt = tmp_path / "ckpt"
    assert checkpointing.resolve(ckpt).name == "iter_0000004"
    assert not (ckpt / "iter_0000008").exists()
    killed = losses(tmp_path / "ckpt_logs")
    assert {it: ref[it] for it in killed} == killed  # bit-identical up to the kill

    out = train_ok([*RUN, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
                    f"logger.log_dir={tmp_path / 'resumed_logs'}"])  # fmt: skip
    assert f"resumed from {ckpt / 'iter_0000004'} at iteration 4" in out
    resumed = read_metrics(tmp_path / "resumed_logs")
    assert_same_losses(losses(tmp_path / "resumed_logs"), ref, range(5, ITERS + 1))
    # The data order continues: iteration i has consumed exactly i global batches.
    assert [r["consumed_samples"] for r in resumed] == [i * GBS for i in range(5, ITERS + 1)]


def test_sigterm_saves_where_it_was_then_resume_reproduces_losses(reference, tmp_path):
    ref, _ = reference
    ckpt = tmp_path / "ckpt"
    live = Live([*RUN, *dirs(tmp_path, "ckpt")])
    live.wait_for(f"iteration 5/{ITERS}")
    live.proc.send_signal(signal.SIGTERM)
    assert live.finish() == 0, live.output[-4000:]
    found = re.search(r"received SIGTERM: saved iteration (\d+) in (\S+); exiting", live.output)
    assert found, live.output[-4000:]
    stopped = int(found.group(1))
    assert 5 <= stopped < ITERS and Path(found.group(2)) == ckpt / f"iter_{stopped:07d}"
    assert checkpointing.resolve(ckpt) == ckpt / f"iter_{stopped:07d}"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(stopped)

    train_ok([*RUN, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}",
              f"logger.log_dir={tmp_path / 'resumed_logs'}"])  # fmt: skip
    assert_same_losses(losses(tmp_path / "resumed_logs"), ref, range(stopped + 1, ITERS + 1))


def test_sigterm_to_torchrun_reaches_both_ranks_and_saves(tmp_path):
    ckpt = tmp_path / "ckpt"
    live = Live([*RUN, "train.train_iters=100", *dirs(tmp_path, "ckpt")], nproc=2)
    # After a first save: torchrun SIGKILLs ranks that take over 30 s to exit, and a
    # process's first save starts dist_checkpointing's helper process (slow on a busy CPU).
    live.wait_for("iteration 5/100")
    live.proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to each rank
    live.finish()
    found = re.search(r"received SIGTERM: saved iteration (\d+) in (\S+); exiting", live.output)
    assert found, live.output[-4000:]
    assert checkpointing.resolve(ckpt) == Path(found.group(2))
    assert "exitcode" not in live.output, "a rank failed instead of saving and exiting"


def test_time_budget_saves_and_exits_0(tmp_path):
    out = train_ok([*RUN, "train.exit_duration_in_mins=0", *dirs(tmp_path, "ckpt")])
    assert "train.exit_duration_in_mins=0.0 reached: saved iteration 1" in out
    assert checkpointing.resolve(tmp_path / "ckpt").name == "iter_0000001"


def test_damaged_checkpoints_are_skipped_or_refused(reference, tmp_path):
    ref, reference_ckpt = reference
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference_ckpt, ckpt)
    shard = max((ckpt / "iter_0000010").glob("*.distcp"), key=lambda p: p.stat().st_size)
    os.truncate(shard, shard.stat().st_size // 2)  # a copy or a disk that gave up halfway
    (ckpt / "iter_0000008" / ".metadata").unlink()
    (ckpt / ".tmp-iter_0000012").mkdir()  # a save that was killed

    rc, out = run(["train.train_iters=1", f"checkpoint.load={ckpt / 'iter_0000010'}",
                   *dirs(tmp_path, "other")])  # fmt: skip
    assert rc == 2 and "Traceback" not in out, out[-4000:]
    (line,) = error_lines(out)
    assert f"checkpoint {ckpt / 'iter_0000010'} is incomplete or damaged: {shard.name} has" in line

    out = train_ok([*RUN, "train.train_iters=5", f"checkpoint.save={ckpt}",
                    f"checkpoint.load={ckpt}", f"logger.log_dir={tmp_path / 'logs'}"])  # fmt: skip
    assert f"skipping checkpoint {ckpt / 'iter_0000010'}: {shard.name} has" in out
    assert f"skipping checkpoint {ckpt / 'iter_0000008'}: .metadata is missing" in out
    assert f"ignoring {ckpt / '.tmp-iter_0000012'}: a save that did not finish" in out
    assert f"resumed from {ckpt / 'iter_0000004'} at iteration 4" in out
    assert_same_losses(losses(tmp_path / "logs"), ref, [5])
    assert not (ckpt / ".tmp-iter_0000012").exists(), "cleaned up by the next good save"


def test_nan_steps_are_skipped_then_the_limit_stops_with_the_last_good_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    rc, out = run(
        [*RUN, "train.skip_nonfinite_limit=2", *dirs(tmp_path, "ckpt")],
        MEGABRIDGE_INJECT_NAN_AT="2,4,5",
    )
    assert rc == 2 and "Traceback" not in out, out[-4000:]
    assert "iteration 2: non-finite loss nan / grad norm nan: update skipped (1 in a row" in out
    (line,) = error_lines(out)
    assert "iterations 4-5 had a non-finite loss or gradient norm" in line
    assert f"last good state, iteration 3, saved in {ckpt / 'iter_0000003'}" in line

    records = {r["iteration"]: r for r in read_metrics(tmp_path / "ckpt_logs")}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert [records[i]["skipped_iterations"] for i in records] == [0, 1, 1, 2, 3]
    assert records[3]["loss"] == records[3]["loss"], "iteration 3 trained normally"
    assert checkpointing.resolve(ckpt).name == "iter_0000003"
    meta = checkpointing.read_metadata(ckpt / "iter_0000003")
    assert meta["train_state"] == {"iteration": 3, "consumed_samples": 24, "skipped_iterations": 1}

    # iter_4 was saved after the skipped step 4, iter_3 after the stop: both hold the
    # weights and optimizer state of step 3, bit for bit, and none of them is NaN.
    good = checkpoint_tensors(ckpt / "iter_0000003", tmp_path / "3.pt")
    after_skip = checkpoint_tensors(ckpt / "iter_0000004", tmp_path / "4.pt")
    weights = [k for k in good if not k.startswith(("optimizer", "rng"))]
    assert len(weights) > 10 and set(good) == set(after_skip)
    for k in good:
        assert torch.isfinite(good[k].float()).all(), k
        assert torch.equal(good[k], after_skip[k]), k


def test_a_dead_rank_fails_the_launch_quickly(tmp_path):
    start = time.time()
    rc, out = run(
        [*RUN, "dist.distributed_timeout_minutes=1", *dirs(tmp_path, "ckpt")],
        nproc=2,
        timeout=180,
        MEGABRIDGE_INJECT_EXIT_AT="1:3",
    )
    assert rc != 0 and time.time() - start < 120, out[-4000:]
    assert "rank 1: MEGABRIDGE_INJECT_EXIT_AT: dying at iteration 3" in out
    # torchrun's summary names the rank and its exit code
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: 13", out), out[-4000:]


def test_unwritable_save_folder_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, out = run([*RUN, f"checkpoint.save={blocker / 'ckpt'}", "train.train_iters=1"])
    assert rc == 2 and "Traceback" not in out, out[-4000:]
    (line,) = error_lines(out)
    assert f"checkpoint.save={blocker / 'ckpt'} is not writable: [Errno 20] Not a directory" in line


# The disk fills up while rank 1 writes its shard (TP=2) of the second checkpoint:
# the process patches dist_checkpointing's writer, which its writer processes inherit.
DISK_FULL = """
import errno, functools, io, os, sys
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megabridge.cli import main
from megabridge.training import checkpointing

saves, real_save, real_write = [], checkpointing.save, filesystem_async._write_item

def counting_save(*args, **kwargs):
    saves.append(1)
    return real_save(*args, **kwargs)

@functools.wraps(real_write)  # megatron inspects its signature
def write_until_full(*args, **kwargs):
    if len(saves) >= 2 and os.environ["RANK"] == "1":
        stream = next(a for a in args if isinstance(a, io.BufferedWriter))
        stream.write(b"half a tensor")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)
    return real_write(*args, **kwargs)

checkpointing.save, filesystem_async._write_item = counting_save, write_until_full
if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_disk_full_mid_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(script), "--recipe", RECIPE,
           *RUN, "train.train_iters=8", "model.tensor_model_parallel_size=2",
           *dirs(tmp_path, "ckpt")]  # fmt: skip
    result = subprocess.run(
        cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-4000:]
    (line,) = error_lines(out)  # rank 0 says it, once
    assert f"cannot write checkpoint {ckpt / 'iter_0000008'}: [Errno 28] No space left" in line
    assert re.search(r"exitcode\s*: 2", out), "every rank stopped with the CLI's exit code"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ], "no half-written folder left, the previous checkpoint untouched"
    assert checkpointing.verify(ckpt / "iter_0000004") is None
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
