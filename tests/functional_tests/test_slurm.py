"""scripts/slurm/train.sbatch against a real Slurm: preempted, requeued, resumed, same losses.

The cluster (tests/functional_tests/slurm_cluster.py) is started here. .ci/run installs
Slurm and munge (Debian's packages; it needs root) and then requires this test to run; on a
machine without them the test is skipped, saying why.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.functional_tests.slurm_cluster import SlurmCluster, missing
from tests.helpers import REPO, losses, read_metrics, train

pytestmark = pytest.mark.system

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
RECIPE = "vanilla_gpt_pretrain_config"
ITERS = 40  # long enough that the preemption lands mid-run (a few tenths of a second each)
OVERRIDES = [
    f"train.train_iters={ITERS}", "train.global_batch_size=4", "train.micro_batch_size=4",
    "scheduler.lr_warmup_iters=2", "logger.log_interval=1", "logger.tensorboard=false",
    "model.tensor_model_parallel_size=2", "checkpoint.save_interval=None",
]  # fmt: skip


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = missing()
    if why:
        if os.environ.get("MEGABRIDGE_TEST_SLURM") == "required":
            pytest.fail(f"Slurm is installed, yet: {why}")
        pytest.skip(f"no Slurm here: {why}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster, out) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    output = out.read_text() if out.is_file() else "(no job output)"
    raise AssertionError(f"timed out waiting for {what}\n{output[-3000:]}\n{cluster.logs()}")


def _iterations(log_dir) -> list[int]:
    try:
        return [r["iteration"] for r in read_metrics(log_dir) if "loss" in r]
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return []


def test_a_preempted_job_saves_requeues_and_finishes_with_the_same_losses(slurm, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env = {
        "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "NPROC_PER_NODE": "2",
        "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "SHUTDOWN_TIMEOUT": "60",
    }  # fmt: skip
    submitted = slurm.run(
        "sbatch", "--parsable", f"--output={out}", f"--chdir={REPO}",
        "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()),
        str(SBATCH), "--recipe", RECIPE, *OVERRIDES,
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    logs = run_dir / "logs"

    # Preempt once training is under way: USR1 to the batch script, as --signal=B:USR1 does.
    _wait(lambda: len(_iterations(logs)) >= 2, 600, "the first iterations", slurm, out)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    _wait(lambda: slurm.job_state(job).get("Restarts", "0") != "0", 300, "the requeue", slurm, out)
    # Slurm holds a requeued job back for about two minutes (its begin time); a few seconds
    # suffice here (a start within the second of the requeue finds its credential revoked).
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now+5")
    _wait(lambda: slurm.job_state(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"),
          900, "the job to end", slurm, out)  # fmt: skip
    text = out.read_text()
    state = slurm.job_state(job)
    assert state["JobState"] == "COMPLETED", f"{state}\n{text[-3000:]}"

    assert "start 1 on" in text and "start 2 on" in text, text[-3000:]
    assert "USR1: asking training to save and stop" in text
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert len(saved) == 2 and saved[-1] == f"iter_{ITERS:07d}", saved
    stopped_at = int(saved[0].removeprefix("iter_"))
    assert 1 <= stopped_at < ITERS, saved
    iterations = _iterations(logs)
    assert iterations == list(range(1, ITERS + 1)), "each iteration once, across the requeue"

    train(2, RECIPE, [*OVERRIDES, f"logger.log_dir={tmp_path / 'ref'}",
                      f"checkpoint.save={tmp_path / 'ref_ckpt'}"])  # fmt: skip
    reference, resumed = losses(tmp_path / "ref"), losses(logs)
    assert sorted(resumed) == sorted(reference)
    for it in reference:
        assert resumed[it] == pytest.approx(reference[it], rel=1e-5), it
