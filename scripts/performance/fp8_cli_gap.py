"""Why eager FP8 trains 20x slower through `megabridge train` than in train_throughput.py.

    python scripts/performance/fp8_cli_gap.py --out DIR [--cases cli,cli-mock,bench] [--steps 8]

Each case runs in a fresh process, FP8 tensorwise, the Llama-3.2-1B recipe at vocab 32768,
untied, micro-batch 4 x 2048 tokens (fp8_loss_curve.py's settings), and prints each step's
time and the dynamo graphs compiled during it, then a torch.profiler table (CPU and CUDA) of
two steps:

* ``cli``: `megabridge train` itself (cli.main in this process) on an indexed dataset of the
  standard library's source, as fp8_loss_curve.py runs it;
* ``cli-mock``: the same command on mock data;
* ``bench``: train_throughput.py's way (loop.setup + train_step, mock data, its config);
  ``bench16``: the same at micro-batch 16 (where train_throughput.py measured 65k tokens/s).

Tables go to DIR/<case>.txt too. Needs a GPU with FP8 tensor cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO / "src"), str(HERE)]

RECIPE = "llama32_1b_pretrain_config"


def _overrides(out: Path, case: str, steps: int, mbs: int) -> list[str]:
    run = out / "runs" / case
    data = ["dataset.type=indexed", f"dataset.blend={out / 'data' / 'stdlib'}",
            f"tokenizer.path={out / 'tokenizer'}"]  # fmt: skip
    return [
        *(data if case == "cli" else []),
        "dataset.seq_length=2048", "model.seq_length=2048", "model.vocab_size=32768",
        "model.share_embeddings_and_output_weights=false", f"train.train_iters={steps}",
        f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs}",
        f"checkpoint.save_interval={steps * 10}", "logger.tensorboard=false",
        f"checkpoint.save={run / 'ckpt'}", f"logger.log_dir={run / 'logs'}", "model.fp8=tensorwise",
    ]  # fmt: skip


class StepTimer:
    """Wraps train_step: times each step (CUDA-synchronised), profiles steps [first, first+2)."""

    def __init__(self, train_step, profile_from: int, report: Path):
        self.train_step, self.profile_from, self.report = train_step, profile_from, report
        self.i, self.prof, self.stop_after_profile = 0, None, False

    def __call__(self, *args, **kwargs):
        from torch._dynamo.utils import counters
        from torch.profiler import ProfilerActivity, profile

        if self.i == self.profile_from:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
        graphs = counters["stats"]["unique_graphs"]
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = self.train_step(*args, **kwargs)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        new = counters["stats"]["unique_graphs"] - graphs
        print(f"STEP {self.i} {ms:9.1f} ms  new dynamo graphs {new}  loss {result[0]:.4f}",
              flush=True)  # fmt: skip
        self.i += 1
        if self.prof is not None and self.i == self.profile_from + 2:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages()
            text = (table.table(sort_by="cuda_time_total", row_limit=25) + "\n"
                    + table.table(sort_by="self_cpu_time_total", row_limit=25))  # fmt: skip
            self.report.write_text(text)
            print(table.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
            print(table.table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))
            self.prof = None
            if self.stop_after_profile:  # the CLI would write a 1.1B checkpoint at the end
                raise SystemExit(0)
        return result


def child(args) -> None:
    from megabridge.training import loop

    out = Path(args.out)
    timer = StepTimer(loop.train_step, args.steps - 3, out / f"{args.child}.txt")
    overrides = _overrides(out, args.child, args.steps, args.mbs)
    if args.child in ("cli", "cli-mock"):
        from megabridge.cli import main

        loop.train_step, timer.stop_after_profile = timer, True
        sys.exit(main(["train", "--recipe", RECIPE, *overrides]))
    # bench: train_throughput.py's config and loop
    import train_throughput as tt

    from megabridge import runtime
    from megabridge.cli import quiet_expected_warnings, setup_logging
    from megabridge.training.config import apply_overrides

    quiet_expected_warnings()
    setup_logging()
    ns = argparse.Namespace(recipe=RECIPE, warmup=0, iters=args.steps, seq=2048,
                            overrides=["model.vocab_size=32768",
                                       "model.share_embeddings_and_output_weights=false"])  # fmt: skip
    mbs = 16 if args.child == "bench16" else args.mbs
    cfg = tt._config(ns, mbs, str(out / "runs" / args.child))
    apply_overrides(cfg, ["model.fp8=tensorwise"])
    s = loop.setup(cfg)
    for i in range(args.steps):
        timer(cfg, s.model, s.optimizer, s.scheduler, s.train_data, i * mbs)
    runtime.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="cli,cli-mock,bench")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--timeout", type=int, default=150, help="seconds per case")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    if "cli" in cases:
        import fp8_loss_curve as lc

        corpus = lc.stdlib_corpus(out / "stdlib.jsonl", args.corpus_mb)
        lc.train_tokenizer(corpus, out / "tokenizer", 32768)
        (out / "data").mkdir(exist_ok=True)
        lc.megabridge("data", "preprocess", "--input", str(corpus), "--tokenizer",
                      str(out / "tokenizer"), "--output-prefix", str(out / "data" / "stdlib"),
                      "--workers", "8", "--overwrite")  # fmt: skip
    for case in cases:
        print(f"\n===== {case}", flush=True)
        cmd = [sys.executable, __file__, "--out", str(out), "--child", case,
               "--steps", str(args.steps), "--mbs", str(args.mbs)]  # fmt: skip
        try:
            subprocess.run(cmd, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"{case}: stopped after {args.timeout} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
