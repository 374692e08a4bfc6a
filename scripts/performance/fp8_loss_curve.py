"""FP8 against bf16 on real text: the same run's loss curve, step by step.

    python scripts/performance/fp8_loss_curve.py --iters 300 --out DIR \
        [--variant fp8:model.fp8=tensorwise ...] [-- overrides for every run]

Real text, made offline: the Python standard library's own source files (this
interpreter's ``stdlib`` folder) as a JSONL corpus, a byte-level BPE tokenizer trained on
it (``--vocab``, default 32768), and ``megabridge data preprocess`` into an indexed
dataset. Then ``megabridge train`` runs the recipe on it once in bf16 and once per
``--variant`` (LABEL:section.field=value[,...]), same seed, data order and schedule, and
the script prints each variant's loss against bf16's: the largest relative difference of
the 20-step moving averages after the warm-up, and the last 20 steps' mean; then the mean of
each block of 20 steps side by side, and each run's tokens/s (the median of the logged
rates after its first 10 steps, which compile). Exit code 1 if a variant strays past
``--tolerance`` (default 1%) or does not run (each run is reported). ``--run-limit S``
stops a run after S seconds and compares it as far as it got (said so in the table), so
that one call of a time-limited machine still prints every run's numbers.
``--seeds 1234,4321,99`` runs each of them once per seed and compares the step-by-step means
(a second bf16 seed alone strayed up to 8% in 20-step blocks at 16k tokens a step: the
blocks' losses depend on which files they hold); ``--global-batch`` accumulates micro-batches.
The runs save no checkpoint (``checkpoint.save_at_end=false``: a 1.1B model's with its
optimizer is 13 GB, longer to write than 300 steps take). ``--report-only`` prints the
tables again from the runs already in ``--out`` (same labels and seeds) without training;
``--train LABEL,...`` trains only those runs and reports on all (the others from an earlier
call's ``--out/runs``).
``--variant bf16-again:`` (no overrides) runs bf16 a second time: whether two runs of the same
seed and data drift apart on this GPU, the yardstick for any variant's difference.
``--measure-compiled-fp8`` lets ``model.compile_layers=true`` run with ``model.fp8``, which
users are refused until this curve and tests/unit_tests/models/test_fp8_gradients.py on a GPU
show it right.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WINDOW = 20  # steps per moving average


def stdlib_corpus(out: Path, limit_mb: float) -> Path:
    """One JSONL line per .py file of the standard library, up to ``limit_mb`` MB of text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget, lines = limit_mb * 2**20, []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        lines.append(json.dumps({"text": text}))
        budget -= len(text)
        if budget <= 0:
            break
    out.write_text("\n".join(lines) + "\n")
    return out


def train_tokenizer(corpus: Path, folder: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"])
    texts = (json.loads(line)["text"] for line in corpus.read_text().splitlines())
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(folder)
    )
    return folder


# `megabridge` with model.compile_layers + model.fp8 let through: that refusal
# (models/compiled.py) waits on this very measurement, so --measure-compiled-fp8 lifts it in
# the training process this script starts, never for users.
MEASURE_COMPILED_FP8 = (
    "import sys; from megabridge.models import compiled; from megabridge.cli import main; "
    "check = compiled.check_compile_supported; "
    "compiled.check_compile_supported = lambda impl, fp8_recipe: check(impl, None); "
    "sys.argv[0] = 'megabridge'; sys.exit(main())"
)


def megabridge(*args: str, compiled_fp8: bool = False, limit: float | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    entry = ["-c", MEASURE_COMPILED_FP8] if compiled_fp8 else ["-m", "megabridge"]
    subprocess.run([sys.executable, *entry, *args], check=True, env=env, timeout=limit)


def records(log_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut off by a stopped run is left out."""
    path, out = log_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def losses(log_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records(log_dir) if "loss" in r}


def tokens_per_s(log_dir: Path, skip: int = 10) -> float | None:
    """The median logged rate after the first ``skip`` steps (compilation, warm-up)."""
    rates = sorted(
        r["tokens_per_s"] for r in records(log_dir) if "tokens_per_s" in r and r["iteration"] > skip
    )
    return rates[len(rates) // 2] if rates else None


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """The step-by-step mean of several runs' losses, at the steps every run logged."""
    steps = set.intersection(*(set(c) for c in curves)) if curves else set()
    return {s: sum(c[s] for c in curves) / len(curves) for s in sorted(steps)}


def block_means(curve: dict[int, float]) -> dict[int, float]:
    """{first step of each full block of WINDOW steps: the block's mean loss}."""
    blocks: dict[int, list[float]] = {}
    for step, loss in curve.items():
        blocks.setdefault((step - 1) // WINDOW * WINDOW + 1, []).append(loss)
    return {b: sum(v) / len(v) for b, v in sorted(blocks.items()) if len(v) == WINDOW}


def moving(curve: dict[int, float], start: int) -> dict[int, float]:
    steps = sorted(s for s in curve if s >= start)
    return {
        s: sum(curve[t] for t in steps[i - WINDOW + 1 : i + 1]) / WINDOW
        for i, s in enumerate(steps)
        if i >= WINDOW - 1
    }


def compare(reference: dict[int, float], other: dict[int, float], start: int) -> tuple:
    ref_avg, avg = moving(reference, start), moving(other, start)
    common = sorted(ref_avg.keys() & avg.keys())
    worst = max(common, key=lambda s: abs(avg[s] - ref_avg[s]) / ref_avg[s])
    return (
        worst,
        abs(avg[worst] - ref_avg[worst]) / ref_avg[worst],
        ref_avg[common[-1]],
        avg[common[-1]],
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="work folder (corpus, tokenizer, data, runs)")
    p.add_argument("--recipe", default="llama32_1b_pretrain_config")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument(
        "--global-batch", type=int,
        help="sequences a step (default: --mbs); a multiple of --mbs accumulates micro-batches, "
        "which steadies the 20-step means at the cost of run time",
    )  # fmt: skip
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--corpus-mb", type=float, default=40.0, help="text taken from the stdlib")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument(
        "--seeds", type=lambda text: [int(v) for v in text.split(",")],
        help="comma-separated rng.seed values: every run (bf16 and each variant) once per seed, "
        "and each run's curve the step-by-step mean over its seeds (weights and data order "
        "change with the seed; the mean is steadier than one run)",
    )  # fmt: skip
    p.add_argument("--run-limit", type=float, help="seconds per training run (then compared "
                   "as far as it got)")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:OVERRIDES")
    p.add_argument(
        "--measure-compiled-fp8",
        action="store_true",
        help="let model.compile_layers=true run with model.fp8 (refused for users until this "
        "curve and the GPU gradient tests show it right)",
    )
    p.add_argument("--report-only", action="store_true", help="train nothing: compare the runs "
                   "already in --out/runs (the same --variant and --seeds)")  # fmt: skip
    p.add_argument(
        "--train", type=lambda text: text.split(","), metavar="LABEL[,LABEL]",
        help="train only these runs (bf16 and/or --variant labels, every seed); the report "
        "reads the others from --out/runs, where an earlier call left them: one comparison "
        "split over calls of a time-limited machine",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="section.field=value for every run")
    args = p.parse_args()
    global_batch = args.global_batch or args.mbs
    if global_batch % args.mbs:
        sys.exit(f"--global-batch {global_batch} is not a multiple of --mbs {args.mbs}")
    out = Path(args.out)
    runs = {"bf16": []}
    for text in args.variant:
        label, _, overrides = text.partition(":")
        runs[label] = overrides.split(",") if overrides else []  # "again:": bf16 once more
    seeds = args.seeds or [None]  # None: the recipe's own seed
    if unknown := set(args.train or ()) - set(runs):
        sys.exit(f"--train {','.join(sorted(unknown))}: not bf16 or a --variant label")
    to_train = {label: runs[label] for label in args.train or runs}
    failed_runs = [] if args.report_only else train_all(args, out, to_train, seeds, global_batch)
    return report(args, out, runs, seeds, global_batch, failed_runs)


def run_name(label: str, seed: int | None) -> str:
    return label if seed is None else f"{label}-seed{seed}"


def train_all(args, out: Path, runs: dict, seeds: list, global_batch: int) -> list[str]:
    """Every run of ``runs`` once per seed, into out/runs/<name>; returns the failures' lines."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(out / "stdlib.jsonl", args.corpus_mb)
    tokenizer = train_tokenizer(corpus, out / "tokenizer", args.vocab)
    prefix = out / "data" / "stdlib"
    prefix.parent.mkdir(exist_ok=True)
    megabridge("data", "preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer),
               "--output-prefix", str(prefix), "--workers", "8", "--overwrite")  # fmt: skip
    common = [
        "dataset.type=indexed", f"dataset.blend={prefix}", f"tokenizer.path={tokenizer}",
        f"dataset.seq_length={args.seq}", f"model.seq_length={args.seq}",
        f"model.vocab_size={args.vocab}", "model.share_embeddings_and_output_weights=false",
        f"train.train_iters={args.iters}", f"train.micro_batch_size={args.mbs}",
        f"train.global_batch_size={global_batch}",
        "checkpoint.save_interval=None", "checkpoint.save_at_end=false",
        "logger.tensorboard=false", *args.overrides,
    ]  # fmt: skip
    failed_runs = []
    for label, overrides in runs.items():
        for seed in seeds:
            name = run_name(label, seed)
            run = out / "runs" / name
            shutil.rmtree(run / "logs", ignore_errors=True)  # no curve from an earlier call
            seeded = [] if seed is None else [f"rng.seed={seed}"]
            try:
                megabridge("train", "--recipe", args.recipe, *common, *seeded,
                           f"checkpoint.save={run / 'ckpt'}", f"logger.log_dir={run / 'logs'}",
                           *overrides, compiled_fp8=args.measure_compiled_fp8,
                           limit=args.run_limit)  # fmt: skip
            except subprocess.CalledProcessError as e:  # refused (exit 2) or crashed: go on
                failed_runs.append(
                    f"{name}: megabridge train exited with {e.returncode} (output above)"
                )
            except subprocess.TimeoutExpired:
                pass  # compared as far as it got
            print(run_summary(name, run / "logs"), flush=True)  # seen even if the call is cut
    return failed_runs


def run_summary(name: str, logs: Path) -> str:
    """One line as soon as a run ends: its last step, last 20 steps' mean loss and tokens/s."""
    curve, rate = losses(logs), tokens_per_s(logs)
    if not curve:
        return f"run {name}: no step logged"
    last = [curve[s] for s in sorted(curve)[-WINDOW:]]
    rate_text = f"{rate:,.0f} tokens/s" if rate else "no rate yet"
    return (
        f"run {name}: step {max(curve)}, last-20 mean loss {sum(last) / len(last):.4f}, {rate_text}"
    )


def report(args, out: Path, runs: dict, seeds: list, global_batch: int, failed_runs) -> int:
    """The tables, from the metrics in out/runs; exit code 1 past --tolerance or on a failure."""
    curves, rates, cut = {}, {}, set()
    for label in runs:
        seed_curves, seed_rates = [], []
        for seed in seeds:
            name = run_name(label, seed)
            logs = out / "runs" / name / "logs"
            if curve := losses(logs):
                seed_curves.append(curve)
                seed_rates.append(tokens_per_s(logs))
                if max(curve) < args.iters:
                    cut.add(label)
            elif not any(line.startswith(f"{name}:") for line in failed_runs):
                failed_runs.append(f"{name}: no step in {logs / 'metrics.jsonl'}")
        if len(seed_curves) == len(seeds):  # a label with a failed seed is not averaged
            curves[label] = mean_curve(seed_curves)
            known = [r for r in seed_rates if r is not None]
            rates[label] = sum(known) / len(known) if known else None
    start = min(args.iters // 5, 50)  # past the warm-up's steepest part
    print(
        f"\nloss, {args.recipe}, {args.iters} steps of {global_batch} x {args.seq} tokens of "
        "stdlib source" + (f", each run the mean over seeds {args.seeds}" if args.seeds else "")
    )
    print(f"{'run':24s} {'first':>8s} {'last 20':>8s} {'worst rel diff of 20-step means':>34s}")
    failed = False
    reference = curves.get("bf16", {})
    for label, curve in curves.items():
        last = sum(curve[s] for s in sorted(curve)[-WINDOW:]) / WINDOW
        line = f"{label:24s} {curve[min(curve)]:8.4f} {last:8.4f}"
        if label != "bf16" and reference:
            try:
                step, worst, _, _ = compare(reference, curve, start)
            except ValueError:  # no 20-step window past the warm-up in common
                failed, line = True, line + "   (too few steps to compare)"
            else:
                failed |= worst > args.tolerance
                line += f" {worst:14.2%} at step {step}"
        if label in cut:  # with seeds: the steps every seed's run reached
            failed, line = True, line + f"   (stopped at step {max(curve)} of {args.iters})"
        print(line)
    print("\n20-step mean losses (steps), and tokens/s (median after step 10)")
    means = {label: block_means(curve) for label, curve in curves.items()}
    labels = list(curves)
    print(f"{'steps':>9s} " + " ".join(f"{label:>20s}" for label in labels))
    for b in sorted({b for m in means.values() for b in m}):
        cells = []
        for label in labels:
            value, cell = means[label].get(b), ""
            if value is not None:
                cell = f"{value:.3f}"
                if label != "bf16" and b in means.get("bf16", {}):
                    cell += f" ({value / means['bf16'][b] - 1:+.2%})"
            cells.append(f"{cell:>20s}")
        print(f"{b:4d}-{b + WINDOW - 1:<4d} " + " ".join(cells))
    print(f"{'tokens/s':>9s} " + " ".join(f"{rates.get(label) or 0:20,.0f}" for label in labels))
    for line in failed_runs:
        print(line)
    return 1 if failed or failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
