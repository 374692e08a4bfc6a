"""Training throughput of a recipe on this GPU, optionally side by side with plain transformers.

    python scripts/performance/train_throughput.py --recipe llama32_1b_pretrain_config \
        --mbs 1 2 4 8 --seq 2048 --compare-hf model.vocab_size=32768 \
        model.share_embeddings_and_output_weights=false

For each micro-batch size: one micro-batch per optimizer step, ``--iters`` timed
steps after ``--warmup``; the median step time gives tokens/s. Model FLOPs are
counted as Megatron-Core's num_floating_point_operations counts them (causal
attention, gated MLP, logits layer); MFU is against 989 TFLOP/s (H100 dense
bf16 peak) and against ``--ceiling`` (the matmul rate measured on the machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from megabridge.cli import quiet_expected_warnings, setup_logging  # noqa: E402
from megabridge.training.flops import H100_BF16_PEAK_TFLOPS, flops_per_token  # noqa: E402


def _config(args, mbs: int, workdir: str):
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    cfg = get_recipe(args.recipe)
    apply_overrides(cfg, args.overrides)
    cfg.train.micro_batch_size = cfg.train.global_batch_size = mbs
    cfg.train.train_iters = args.warmup + args.iters
    cfg.train.eval_interval = None
    cfg.dataset.type, cfg.dataset.seq_length = "mock", args.seq
    cfg.model.seq_length = max(cfg.model.seq_length, args.seq)
    cfg.checkpoint.save, cfg.logger.log_dir = f"{workdir}/ckpt", f"{workdir}/logs"
    cfg.logger.tensorboard = False
    return cfg


def _time_steps(step, warmup: int, iters: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _result(
    name: str, mbs: int, seq: int, times: list[float], flops_tok: float, ceiling: float
) -> dict:
    step = statistics.median(times)
    tokens_s = mbs * seq / step
    tflops = tokens_s * flops_tok / 1e12
    return {
        "impl": name,
        "micro_batch": mbs,
        "step_ms": step * 1e3,
        "tokens_per_s": tokens_s,
        "tflops_per_gpu": tflops,
        "mfu_989": tflops / H100_BF16_PEAK_TFLOPS,
        "mfu_ceiling": tflops / ceiling,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def run_megabridge(args, mbs: int) -> dict:
    from megabridge import runtime
    from megabridge.training.loop import setup
    from megabridge.training.step import train_step

    with tempfile.TemporaryDirectory() as workdir:
        cfg = _config(args, mbs, workdir)
        torch.cuda.reset_peak_memory_stats()
        s = setup(cfg)
        flops_tok = flops_per_token(cfg.model, args.seq)

        def step(i):
            train_step(cfg, s.model, s.optimizer, s.scheduler, s.train_data, i * mbs)

        try:
            times = _time_steps(step, args.warmup, args.iters)
            if args.profile:
                _profile(step)
            return _result("megabridge", mbs, args.seq, times, flops_tok, args.ceiling)
        finally:
            runtime.shutdown()


def run_hf(args, mbs: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from megabridge.conversion.registry import bridge_for_family
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    cfg = get_recipe(args.recipe)
    apply_overrides(cfg, args.overrides)
    data = bridge_for_family(cfg.model.family).hf_config_dict(cfg.model)
    model_type = data.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **data)
    hf_config._attn_implementation = "sdpa"
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_config(hf_config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (mbs, args.seq + 1), device="cuda", generator=gen
    )

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        optimizer.step()
        out.loss.item()

    times = _time_steps(step, args.warmup, args.iters)
    return _result("hf", mbs, args.seq, times, flops_per_token(cfg.model, args.seq), args.ceiling)


def _profile(step) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step(i)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)


def _guarded(fn, args, mbs) -> dict:
    """Run one measurement; free its model before the next (the closures die on return)."""
    try:
        return fn(args, mbs)
    except torch.cuda.OutOfMemoryError:
        return {"impl": fn.__name__.removeprefix("run_"), "micro_batch": mbs, "oom": True}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _row(r: dict) -> str:
    if r.get("oom"):
        return f"{r['impl']:11s} {r['micro_batch']:3d}   out of memory"
    return (f"{r['impl']:11s} {r['micro_batch']:3d} {r['step_ms']:8.1f} {r['tokens_per_s']:10,.0f} "
            f"{r['tflops_per_gpu']:8.1f} {r['mfu_989']:8.1%} {r['mfu_ceiling']:8.1%} {r['peak_mem_gib']:8.1f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", default="llama32_1b_pretrain_config")
    p.add_argument("--mbs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ceiling", type=float, default=798.0, help="measured bf16 matmul TFLOP/s")
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also time transformers (sdpa, autocast, fused AdamW)",
    )
    p.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of megabridge"
    )
    p.add_argument("--json-out", help="write all results here")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("train_throughput.py needs a GPU")
    quiet_expected_warnings()
    setup_logging()
    results = []
    for mbs in args.mbs:
        for fn in (run_megabridge, run_hf) if args.compare_hf else (run_megabridge,):
            results.append(_guarded(fn, args, mbs))
            print("result:", _row(results[-1]), flush=True)  # kept even if a later size is cut off
    print(
        f"\n{torch.cuda.get_device_name()} | seq {args.seq} | recipe {args.recipe} {' '.join(args.overrides)}"
    )
    print(
        "FLOPs: Megatron-Core's num_floating_point_operations (causal attention, gated MLP, logits)"
    )
    print(f"{'impl':11s} {'mbs':>3s} {'step ms':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU/989':>8s} "
          f"{'MFU/ceil':>8s} {'peak GiB':>8s}")  # fmt: skip
    for r in results:
        print(_row(r))
    ours = [r for r in results if r["impl"] == "megabridge" and not r.get("oom")]
    hf = [r for r in results if r["impl"] == "hf" and not r.get("oom")]
    if ours and hf:
        best_ours = max(r["tokens_per_s"] for r in ours)
        best_hf = max(r["tokens_per_s"] for r in hf)
        print(
            f"best megabridge / best HF tokens/s: {best_ours:,.0f} / {best_hf:,.0f} = {best_ours / best_hf:.2f}x"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
