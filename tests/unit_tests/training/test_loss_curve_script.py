"""The curve arithmetic of scripts/performance/fp8_loss_curve.py (its runs need a GPU): the
mean over seeds, the 20-step blocks and the comparison against bf16."""

import pytest

from tests.helpers import performance_script

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def curves():
    return performance_script("fp8_loss_curve")


def test_the_mean_over_seeds_is_taken_at_the_steps_every_run_logged(curves):
    a = {1: 4.0, 2: 3.0, 3: 2.0}
    b = {1: 6.0, 2: 5.0}  # stopped by --run-limit after step 2
    assert curves.mean_curve([a, b]) == {1: 5.0, 2: 4.0}
    assert curves.mean_curve([a]) == a
    assert curves.mean_curve([]) == {}


def test_blocks_and_the_worst_moving_average(curves):
    window = curves.WINDOW
    reference = {s: 10.0 for s in range(1, 3 * window + 1)}
    other = {**reference, **{s: 10.5 for s in range(2 * window + 1, 2 * window + 6)}}
    other.pop(3 * window)  # the last block is one step short
    blocks = curves.block_means(other)
    assert sorted(blocks) == [1, window + 1]  # only full blocks
    step, worst, _, _ = curves.compare(reference, other, start=1)
    # five steps 5% high inside one 20-step window: 1.25% at the window holding all five
    assert worst == pytest.approx(5 * 0.5 / window / 10.0)
    assert 2 * window + 5 <= step < 3 * window


def _metrics(folder, losses: dict[int, float]) -> None:
    import json

    folder.mkdir(parents=True)
    lines = [json.dumps({"iteration": s, "loss": v, "tokens_per_s": 1000.0 * s})
             for s, v in losses.items()]  # fmt: skip
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _report(curves, out, iters: int, tolerance: float = 0.01) -> int:
    import argparse

    args = argparse.Namespace(iters=iters, tolerance=tolerance, recipe="r", seq=8, seeds=[1, 2])
    runs = {"bf16": [], "fp8": ["model.fp8=tensorwise"]}
    return curves.report(args, out, runs, [1, 2], 4, [])


def test_report_only_compares_the_seed_means_of_runs_on_disk(curves, tmp_path, capsys):
    iters = 3 * curves.WINDOW
    flat = {s: 4.0 for s in range(1, iters + 1)}
    _metrics(tmp_path / "runs/bf16-seed1/logs", flat)
    _metrics(tmp_path / "runs/bf16-seed2/logs", flat)
    # one seed 1% high, the other 0.5% low: their mean is 0.25% high, inside the tolerance
    _metrics(tmp_path / "runs/fp8-seed1/logs", {s: 4.04 for s in flat})
    _metrics(tmp_path / "runs/fp8-seed2/logs", {s: 3.98 for s in flat})
    assert _report(curves, tmp_path, iters) == 0
    out = capsys.readouterr().out
    assert "0.25% at step" in out and "(+0.25%)" in out
    assert _report(curves, tmp_path, iters, tolerance=0.002) == 1


def test_report_only_flags_a_run_that_stopped_early_or_is_missing(curves, tmp_path, capsys):
    iters = 3 * curves.WINDOW
    full = {s: 4.0 for s in range(1, iters + 1)}
    for name in ("bf16-seed1", "bf16-seed2", "fp8-seed1"):
        _metrics(tmp_path / "runs" / name / "logs", full)
    _metrics(tmp_path / "runs/fp8-seed2/logs", {s: 4.0 for s in range(1, iters - 5)})
    assert _report(curves, tmp_path, iters) == 1
    assert f"stopped at step {iters - 6} of {iters}" in capsys.readouterr().out
    (tmp_path / "runs/fp8-seed2/logs/metrics.jsonl").unlink()
    assert _report(curves, tmp_path, iters) == 1
    assert "fp8-seed2: no step in" in capsys.readouterr().out


def test_each_run_is_summed_up_in_one_line_as_it_ends(curves, tmp_path):
    _metrics(tmp_path / "logs", {s: 3.0 + s / 100 for s in range(1, 31)})
    line = curves.run_summary("fp8-seed1", tmp_path / "logs")
    # the last 20 steps: 3.11 .. 3.30, mean 3.205; the rate's median after step 10: 21,000
    assert line == "run fp8-seed1: step 30, last-20 mean loss 3.2050, 21,000 tokens/s"
    assert curves.run_summary("x", tmp_path / "none") == "run x: no step logged"


def test_train_picks_the_runs_to_train_and_the_report_reads_all(curves, tmp_path, monkeypatch):
    iters = 2 * curves.WINDOW
    flat = {s: 4.0 for s in range(1, iters + 1)}
    _metrics(tmp_path / "runs/bf16-seed1/logs", flat)  # from an earlier call
    trained = []

    def train_all(args, out, runs, seeds, global_batch):
        trained.append((dict(runs), seeds))
        _metrics(out / "runs/fp8-seed1/logs", {s: 4.2 for s in flat})
        return []

    monkeypatch.setattr(curves, "train_all", train_all)
    argv = ["x", "--out", str(tmp_path), "--iters", str(iters), "--seeds", "1",
            "--variant", "fp8:model.fp8=tensorwise", "--variant", "again:"]  # fmt: skip
    monkeypatch.setattr("sys.argv", [*argv, "--train", "fp8"])
    # fp8 trained alone, bf16 read from disk: 5% off, past the tolerance; "again" has no run
    assert curves.main() == 1
    assert trained == [({"fp8": ["model.fp8=tensorwise"]}, [1])]
    monkeypatch.setattr("sys.argv", [*argv, "--train", "fp8,bf17"])
    with pytest.raises(SystemExit, match="--train bf17: not bf16 or a --variant label"):
        curves.main()
