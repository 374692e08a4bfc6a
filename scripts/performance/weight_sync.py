"""Time one weight sync, Megatron -> a live transformers model on the same device, against a
plain device-to-device copy of the same bytes.

Both models are Llama-shaped with random weights (no checkpoint needed), built on the
device, TP=1. Timed (median of --iters after a warm-up), each against the copy:
  plan      ``plan = bridge.sync_plan(model, HFModelConsumer(hf))`` once, ``plan.sync()``
            per step: what an RL loop does (the headline number);
  plan_*    the same with other FOREACH_MAX_BYTES (all batched / all one by one);
  generic   the plan into a consumer that only has ``load_weights(iterable)`` (vLLM's
            protocol): views, bucketed;
  one_shot  ``bridge.sync_weights(model, HFModelConsumer(hf))``: the plan made and used once.
Then every HF tensor is checked equal to the stream's. Prints one JSON line.

    uv run python scripts/performance/weight_sync.py                      # Llama 3.2 1B shape
    uv run python scripts/performance/weight_sync.py --size llama31_8b    # Llama 3.1 8B shape
    uv run python scripts/performance/weight_sync.py --tiny               # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _config(size: str, tiny: bool):
    from transformers import AutoConfig

    from megabridge.models.llama import recipes

    table = recipes.TINY if tiny else recipes.SIZES[size]
    return AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"], **dict(table))


def _models(hf_config, device: torch.device, dtype: torch.dtype):
    """(bridge, Megatron model chunks, transformers model), random weights, on ``device``."""
    from transformers import AutoModelForCausalLM

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.registry import bridge_for_family
    from megabridge.models import init as weight_init

    family = bridge_for_family("llama")
    bridge = AutoBridge(family, family.model_config(hf_config), hf_config.to_dict())
    cfg = bridge.to_megatron_provider()
    cfg.bf16 = dtype == torch.bfloat16
    model = bridge.to_megatron_model(cfg, load_weights=False)
    weight_init.initialize(model, cfg, seed=0)  # built without weights: random ones
    with device:
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return bridge, model, hf_model.eval()


def _timed(fn, device: torch.device, iters: int) -> list[float]:
    times = []
    for _ in range(iters + 1):  # the first one warms up (allocator, kernels)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def _copy_times(nbytes: int, device: torch.device, iters: int) -> list[float]:
    """One flat device-to-device copy of ``nbytes``: the floor a sync is measured against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), device, iters)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Generic:
    """A consumer with only vLLM's protocol: the plan cannot copy into it directly."""

    def __init__(self, consumer):
        self.load_weights, self.finish = consumer.load_weights, consumer.finish


def _check_exact(bridge, model, hf_model, dtype) -> int:
    """Every HF tensor equals what the stream gives for it; the number checked."""
    state = hf_model.state_dict()
    checked = 0
    with bridge.stream_hf_weights(model, dtype=dtype) as stream:
        for name, tensor in stream:
            assert torch.equal(state[name], tensor), name
            checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="llama32_1b", help="a Llama size of models/llama")
    parser.add_argument("--tiny", action="store_true", help="the tiny test shape, on the CPU")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=512)
    args = parser.parse_args()

    from megabridge.conversion import sync_plan
    from megabridge.conversion.weight_sync import HFModelConsumer

    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    bridge, model, hf_model = _models(_config(args.size, args.tiny), device, dtype)
    bucket = args.bucket_mb << 20
    stats = {}

    def timed(make_plan) -> float:
        plan = make_plan()
        return statistics.median(_timed(lambda: stats.update(plan.sync()), device, args.iters))

    consumer = HFModelConsumer(hf_model)
    results = {}
    for name, foreach_max in (("plan", sync_plan.FOREACH_MAX_BYTES), ("plan_all_batched", 1 << 62),
                              ("plan_one_by_one", -1)):  # fmt: skip
        default, sync_plan.FOREACH_MAX_BYTES = sync_plan.FOREACH_MAX_BYTES, foreach_max
        try:
            results[name] = timed(lambda: bridge.sync_plan(model, consumer, dtype, bucket))
        finally:
            sync_plan.FOREACH_MAX_BYTES = default
    generic = _Generic(consumer)
    results["generic"] = timed(lambda: bridge.sync_plan(model, generic, dtype, bucket))
    results["one_shot"] = statistics.median(_timed(
        lambda: stats.update(bridge.sync_weights(model, HFModelConsumer(hf_model), dtype, bucket)),
        device, args.iters))  # fmt: skip
    nbytes = stats["bytes"]
    copy_s = statistics.median(_copy_times(nbytes, device, args.iters))
    checked = _check_exact(bridge, model, hf_model, dtype)

    sync_s = results["plan"]
    print(json.dumps({
        "shape": "tiny" if args.tiny else args.size, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."), "tensors": stats["tensors"],
        "checked_equal": checked, "gbytes": round(nbytes / 1e9, 3),
        "sync_s": round(sync_s, 5), "sync_gb_per_s": round(nbytes / sync_s / 1e9, 1),
        "copy_s": round(copy_s, 5), "copy_gb_per_s": round(nbytes / copy_s / 1e9, 1),
        "sync_over_copy": round(sync_s / copy_s, 2),
        **{f"{k}_s": round(v, 5) for k, v in results.items() if k != "plan"},
        **{f"{k}_over_copy": round(v / copy_s, 2) for k, v in results.items() if k != "plan"},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
