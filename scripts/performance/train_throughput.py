"""Training throughput of a recipe on this GPU, side by side with its peers in the same run.

    python scripts/performance/train_throughput.py --mbs 4 8 16 --compare hf,hf-liger,torchtitan \
        model.vocab_size=32768 model.share_embeddings_and_output_weights=false

For each stack and micro-batch size: one micro-batch per optimizer step, ``--iters`` timed
steps after ``--warmup``, each between two synchronizations: their median step time gives
tokens/s. Then ``--iters`` more steps back to back, as a training run takes them (one
synchronization before the first and after the last): their mean gives "run tokens/s". A
synchronized step also counts what a stack's host does before the step's first kernel (its
data, its schedule), which a run can hide behind the last step's work; on the H200 the two
agreed within 1% for every stack (scripts/performance/NOTES.md, 2026-12-05).
Every stack trains the same shape on the same [mbs, seq] batch with bf16 compute and fp32
master weights, AdamW and gradient clipping (scripts/performance/peers.py says how each peer
is set up); ``--fp8 tensorwise rowwise`` adds megabridge rows with model.fp8 set. Model FLOPs
are counted as Megatron-Core's num_floating_point_operations counts them (causal attention,
gated MLP, logits layer) for every stack; MFU is against 989 TFLOP/s (H100 / H200 dense
bf16 peak, also for FP8 rows) and against ``--ceiling`` (the matmul rate measured on the
machine). Peak GiB is torch's max_memory_allocated during that stack's run. Under each
result, a line gives the row's wall-clock span, each synchronized step, and the GPU's mean
SM clock and power draw over the timed steps (not the warmup's), sampled by nvidia-smi
(gpu_clocks.py): these 700 W boards run training steps at their power cap, so a step's speed
follows its energy.

``--rounds N`` times every stack N times in one process, round after round, and prints each
round's same-run ratios with their median: the GPU machines lent one call after another
differ by 1-2% (their GEMM rates do), more than some changes are worth.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import importlib
import itertools
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py, gpu_clocks.py

import gpu_clocks  # noqa: E402
import peers  # noqa: E402

from megabridge.cli import quiet_expected_warnings, setup_logging  # noqa: E402
from megabridge.training.flops import H100_BF16_PEAK_TFLOPS, flops_per_token  # noqa: E402


def _config(args, mbs: int, workdir: str):
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    cfg = get_recipe(args.recipe)
    apply_overrides(cfg, args.overrides)
    cfg.train.micro_batch_size = cfg.train.global_batch_size = mbs
    cfg.train.train_iters = args.warmup + 2 * args.iters
    cfg.train.eval_interval = None
    cfg.dataset.type, cfg.dataset.seq_length = "mock", args.seq
    cfg.model.seq_length = max(cfg.model.seq_length, args.seq)
    cfg.checkpoint.save, cfg.logger.log_dir = f"{workdir}/ckpt", f"{workdir}/logs"
    cfg.logger.tensorboard = False
    return cfg


def _steps_line(result: dict, began: str, ended: str) -> str:
    """When a row ran (wall clock), each of its synchronized steps (the median alone hides a
    drift across them) and the GPU's mean SM clock and power over its timed steps (where
    nvidia-smi sampled them): two boards at the same power cap differ by their clocks."""
    steps = " ".join(f"{ms:.1f}" for ms in result.get("steps_ms", []))
    clocks = result.get("clocks")
    if clocks:
        steps += "; " + gpu_clocks.ClockSummary(**clocks).line()
    return (
        f"  {result['impl']} mbs {result['micro_batch']}: {began}-{ended}, steps ms {steps or '-'}"
    )


def _timed_with_clocks(step, warmup: int, iters: int):
    """_time_steps' result, and the GPU's clocks and power over its timed steps, warmup left
    out (gpu_clocks; None without nvidia-smi)."""
    device = gpu_clocks.device_id(torch.cuda.get_device_properties(torch.cuda.current_device()))
    log = gpu_clocks.ClockLog(device)
    timed = _time_steps(step, warmup, iters, log)
    return timed, log.summary  # read once the log has closed


def _time_steps(step, warmup: int, iters: int, watch=None) -> tuple[list[float], float]:
    """(each synchronized step's seconds after ``warmup``, the mean seconds of ``iters`` more
    steps taken back to back); ``watch``, where given, is a context around the timed steps
    alone."""
    times = []
    for i in range(warmup):
        torch.cuda.synchronize()
        step(i)
    with watch or contextlib.nullcontext():
        for i in range(warmup, warmup + iters):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step(i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(warmup + iters, warmup + 2 * iters):
            step(i)
        torch.cuda.synchronize()
        run = (time.perf_counter() - start) / iters
    return times, run


def _result(
    name: str, mbs: int, seq: int, timed: tuple[list[float], float], flops_tok: float,
    ceiling: float, clocks=None,
) -> dict:  # fmt: skip
    times, run_step = timed
    step = statistics.median(times)
    tokens_s = mbs * seq / step
    tflops = tokens_s * flops_tok / 1e12
    return {
        "impl": name,
        "micro_batch": mbs,
        "step_ms": step * 1e3,
        "steps_ms": [t * 1e3 for t in times],
        "tokens_per_s": tokens_s,
        "run_step_ms": run_step * 1e3,
        "run_tokens_per_s": mbs * seq / run_step,
        "tflops_per_gpu": tflops,
        "mfu_989": tflops / H100_BF16_PEAK_TFLOPS,
        "mfu_ceiling": tflops / ceiling,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "clocks": None if clocks is None else clocks._asdict(),
    }


# --switch: megabridge's speed-ups that are off by default until measured on a GPU, each a
# module constant (label -> (module, name))
SWITCHES = {
    "first-writes": ("megabridge.training.optim", "FIRST_WRITES"),
}


@contextlib.contextmanager
def switched_on(labels: tuple[str, ...]):
    """SWITCHES' constants named by ``labels`` set to True inside the block."""
    with contextlib.ExitStack() as stack:
        for label in labels:
            module, name = SWITCHES[label]
            stack.enter_context(mock.patch.object(importlib.import_module(module), name, True))
        yield


def run_megabridge(
    args, mbs: int, name: str = "megabridge", overrides: tuple = (), switches: tuple = ()
) -> dict:
    """megabridge's row ``name``: the recipe with the command's overrides, then ``overrides``,
    with SWITCHES' ``switches`` on for the whole row (setup, timing and profile)."""
    with switched_on(switches):
        return _run_megabridge(args, mbs, name, overrides)


def _run_megabridge(args, mbs: int, name: str, overrides: tuple) -> dict:
    from megabridge import runtime
    from megabridge.training.config import apply_overrides
    from megabridge.training.loop import setup
    from megabridge.training.step import train_step

    with tempfile.TemporaryDirectory() as workdir:
        cfg = _config(args, mbs, workdir)
        apply_overrides(cfg, list(overrides))
        torch.cuda.reset_peak_memory_stats()
        s = setup(cfg)
        flops_tok = flops_per_token(cfg.model, args.seq)

        def step(i):
            train_step(cfg, s.model, s.optimizer, s.scheduler, s.train_data, i * mbs)

        try:
            timed, clocks = _timed_with_clocks(step, args.warmup, args.iters)
            _inspect(step, name, args)
            return _result(name, mbs, args.seq, timed, flops_tok, args.ceiling, clocks)
        finally:
            runtime.shutdown()


def run_peer(name: str, args, mbs: int) -> dict:
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    cfg = get_recipe(args.recipe)
    apply_overrides(cfg, args.overrides)
    torch.cuda.reset_peak_memory_stats()
    step = peers.build(name, cfg.model, mbs, args.seq)
    timed, clocks = _timed_with_clocks(step, args.warmup, args.iters)
    _inspect(step, name, args)
    flops_tok = flops_per_token(cfg.model, args.seq)
    return _result(name, mbs, args.seq, timed, flops_tok, args.ceiling, clocks)


def _inspect(step, name: str, args) -> None:
    """After the timed steps: the profile (--profile) and the synchronizing calls (--sync-check)
    of two more steps."""
    if args.profile:
        _profile(step, name)
    if args.sync_check:
        before = torch.cuda.memory_stats()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with synchronizing_sites() as sites:
                for i in range(2):
                    step(i)
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print_sites(name, sites, steps=2)
        # cudaFree waits for the whole device, and the debug mode does not report it
        after = torch.cuda.memory_stats()
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in ALLOCATOR_COUNTS}
        print(f"{name}: the caching allocator in those two steps: " + ", ".join(
            f"{k} +{v}" for k, v in grew.items()), flush=True)  # fmt: skip


ALLOCATOR_COUNTS = (
    "num_device_alloc",
    "num_device_free",
    "num_alloc_retries",
    "num_sync_all_streams",
)


SYNC_WARNING = "synchronizing"  # torch's sync debug mode: "called a synchronizing CUDA operation"


@contextlib.contextmanager
def synchronizing_sites(match: str = SYNC_WARNING):
    """Within the block, each warning whose text holds ``match`` is counted by its call site
    (call_site of the Python stack it was raised from) in the Counter yielded, and not shown;
    other warnings are shown as before."""
    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        show = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if match in str(message):
                sites[call_site(traceback.extract_stack()[:-1])] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = count
        yield sites


def call_site(stack: list[traceback.FrameSummary], frames: int = 3) -> str:
    """The innermost ``frames`` frames of ``stack`` outside torch's own modules, the warnings
    module and this script: "file:line function", innermost first, joined by " < "."""
    skip = ("/torch/", "/warnings.py", "/contextlib.py", Path(__file__).name)
    outside = [f for f in stack if not any(s in f.filename for s in skip)]
    return " < ".join(
        f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}"
        for f in reversed(outside[-frames:])
    )


def print_sites(name: str, sites: collections.Counter, steps: int) -> None:
    print(f"{name}: calls that made the host wait for the GPU, per step (torch's sync debug mode):")
    for site, count in sites.most_common():
        print(f"  {count / steps:6.1f}x  {site}")
    if not sites:
        print("  none")
    print(flush=True)


def _profile(step, name: str) -> None:
    """Two steps' CUDA kernels, the costliest first, and where the GPU sat idle, under
    ``name``'s heading. Host ops are recorded too, to name the op that launched each kernel
    (their profiling adds host time, so the GPU's waits for the host read long)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList
    from torch.profiler import ProfilerActivity, profile

    print(f"profile of two steps: {name}", flush=True)
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
    ) as prof:
        start = time.perf_counter()
        for i in range(2):
            step(i)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / 2
    # The device rows of the profiler's own averages (an EventList of a subset of its events
    # cannot average them again: torch 2.11 asserts that its tree was never built).
    # User annotations (record_function ranges, e.g. "Optimizer.step#AdamW.step") have GPU
    # rows spanning the kernels inside them: counted, they would add those kernels twice.
    averages = [e for e in prof.key_averages() if not _annotation(e)]
    events = EventList([e for e in averages if e.device_type == DeviceType.CUDA], use_device="cuda")
    print(events.table(sort_by="self_device_time_total", row_limit=30), flush=True)
    _print_ops(prof, name)
    kinds: dict[str, float] = {}
    for e in events:
        if e.self_device_time_total > 0:
            kind = _kernel_kind(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 2e3  # ms per step
    total = sum(kinds.values())
    print(f"{name}: GPU ms per step by kind (total {total:.1f}): " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # the trace links kernels to their launches
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())
    print_idle(name, idle_by_cause(gpu_timeline(trace.get("traceEvents", []))), wall_ms, steps=2)


def _annotation(event) -> bool:
    return bool(getattr(event, "is_user_annotation", False))


def _print_ops(prof, name: str, rows: int = 40) -> None:
    """The host ops whose kernels took the most GPU time, by op and input shapes, with calls
    per step: which op a copy, cast or element-wise kernel of the kernel table belongs to."""
    from torch.autograd import DeviceType

    ops = [
        e
        for e in prof.key_averages(group_by_input_shape=True)
        if e.device_type == DeviceType.CPU and e.self_device_time_total > 0 and not _annotation(e)
    ]
    ops.sort(key=lambda e: -e.self_device_time_total)
    print(f"{name}: host ops by their own kernels' GPU time (ms per step, calls per step, shapes)")
    for e in ops[:rows]:
        shapes = str(e.input_shapes)[:110]
        print(
            f"  {e.self_device_time_total / 2e3:7.2f} {e.count / 2:6.1f}x  {e.key[:48]:48s} {shapes}"
        )
    print(flush=True)


# Chrome-trace categories (torch's Kineto export): what runs on the GPU, and the host calls
# that launch it, linked by the "correlation" of their args.
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
GAP_SIZES_US = (5.0, 20.0)  # idle stretches are counted in sizes < 5, 5-20, >= 20 us


def gpu_timeline(trace_events: list[dict]) -> list[tuple[str, float, float, float | None, str]]:
    """Each GPU activity of a Chrome trace as (short name, start us, duration us, the end of
    the host call that launched it or None where the trace has none, "outermost host op > op"
    that made that call or "" where none did)."""
    launched = {
        e["args"]["correlation"]: e["ts"] + e["dur"]
        for e in trace_events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    ops = _host_ops(trace_events)
    timeline = []
    for e in trace_events:
        if e.get("cat") in DEVICE_CATEGORIES and e.get("ph") == "X":
            args = e.get("args", {})
            timeline.append((
                _short_kernel_name(e["name"]), float(e["ts"]), float(e["dur"]),
                launched.get(args.get("correlation")), ops.get(args.get("External id"), ""),
            ))  # fmt: skip
    return timeline


def _host_ops(trace_events: list[dict]) -> dict[int, str]:
    """External id -> "outermost > op" for each host op (the op alone at the top level); an
    op's outermost is the first op on its thread whose span holds it."""
    threads: dict[tuple, list[dict]] = {}
    for e in trace_events:
        if e.get("cat") == "cpu_op" and e.get("ph") == "X":
            threads.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    names = {}
    for ops in threads.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ops: list[dict] = []
        for e in ops:
            while open_ops and open_ops[-1]["ts"] + open_ops[-1]["dur"] <= e["ts"]:
                open_ops.pop()
            outer = open_ops[0] if open_ops else e
            external = e.get("args", {}).get("External id")
            if external is not None:
                names[external] = e["name"] if outer is e else f"{outer['name']} > {e['name']}"
            open_ops.append(e)
    return names


def idle_by_cause(
    timeline: list[tuple[str, float, float, float | None, str]], top: int = 12
) -> dict:
    """Where the GPU ran nothing, given gpu_timeline's rows (several streams may overlap: a
    stretch is idle from the latest end so far to the next start).

    Each idle stretch has a cause: "host late" where the next activity's launch call ended
    after the GPU went idle (the GPU waited for the host), "queued" where it had ended before
    (the time between two activities the GPU already held), "unknown" where the trace links no
    launch. Returns {"activities", "span_us" (first start to last end), "idle_us", "cells":
    {(cause, size bucket): [count, us]}, "top": [(previous activity, next activity [its host
    op], count, us, us of it host late)] by us, the ``top`` costliest pairs}.
    """
    cells: dict[tuple[str, int], list] = {}
    pairs: dict[tuple[str, str], list] = {}
    first, prev_name, prev_end = None, None, None
    for name, start, duration, launch_end, op in sorted(timeline, key=lambda a: a[1]):
        label = f"{name} [{op}]" if op else name
        if prev_end is not None and start > prev_end:
            gap = start - prev_end
            cause = "unknown" if launch_end is None else (
                "host late" if launch_end > prev_end else "queued")  # fmt: skip
            size = sum(gap >= edge for edge in GAP_SIZES_US)
            cell = cells.setdefault((cause, size), [0, 0.0])
            cell[0], cell[1] = cell[0] + 1, cell[1] + gap
            pair = pairs.setdefault((prev_name, label), [0, 0.0, 0.0])
            pair[0], pair[1] = pair[0] + 1, pair[1] + gap
            pair[2] += gap if cause == "host late" else 0.0
        first = start if first is None else first
        if prev_end is None or start + duration >= prev_end:
            prev_name, prev_end = label, start + duration
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "activities": len(timeline),
        "span_us": 0.0 if first is None else prev_end - first,
        "idle_us": sum(us for _, us in cells.values()),
        "cells": cells,
        "top": [(p, n, c, us, late) for (p, n), (c, us, late) in ranked],
    }


def print_idle(name: str, idle: dict, wall_ms: float, steps: int) -> None:
    """idle_by_cause's findings per step: the GPU's span against its busy time, the idle
    stretches by cause and size, and the costliest places they fall."""
    span, gaps = idle["span_us"] / steps / 1e3, idle["idle_us"] / steps / 1e3
    print(f"{name}: per profiled step: host {wall_ms:.1f} ms; GPU span {span:.1f} = busy "
          f"{span - gaps:.1f} + idle {gaps:.1f} ms, {idle['activities'] / steps:,.0f} "
          "GPU activities")  # fmt: skip
    edges = [f"{e:g}" for e in GAP_SIZES_US]
    sizes = [f"< {edges[0]} us", *(f"{a}-{b} us" for a, b in itertools.pairwise(edges)),
             f">= {edges[-1]} us"]  # fmt: skip
    print("  idle ms / stretches per step  " + "".join(f"{s:>18s}" for s in sizes))
    for cause in ("host late", "queued", "unknown"):
        row = [idle["cells"].get((cause, i), [0, 0.0]) for i in range(len(sizes))]
        if any(count for count, _ in row):
            print(f"  {cause:29s} " + "".join(
                f"{us / steps / 1e3:9.2f} / {count / steps:6.1f}" for count, us in row))  # fmt: skip
    print(
        "  the costliest places, ms per step (host late) / count per step: previous -> next [host op]"
    )
    for prev, nxt, count, us, late in idle["top"]:
        print(f"  {us / steps / 1e3:6.2f} ({late / steps / 1e3:5.2f}) {count / steps:6.1f}x  "
              f"{prev}  ->  {nxt}")  # fmt: skip
    print(flush=True)


def _short_kernel_name(name: str) -> str:
    """A kernel's name without its return type, namespaces, arguments and all but the first
    template argument: "void at::native::vectorized_elementwise_kernel<4, at::...>(int, ...)"
    -> "vectorized_elementwise_kernel<4>"; "Memcpy DtoD (Device -> Device)" -> "Memcpy DtoD"."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i, char in enumerate(name):  # the arguments: the first "(" outside the template
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            name = name[:i]
            break
    base, _, template = name.partition("<")
    base = base.rsplit("::", 1)[-1].strip()
    first = template.split(",")[0].split(">")[0].split("<")[0].split("(")[0].strip()
    return f"{base}<{first[:24]}>" if first else base


KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "sm100", "scaled_mm", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    # megabridge's own Triton kernels (models/triton_kernels.py) by their names
    ("compiled (triton)", ("triton", "_swiglu", "_rope_kernel", "_rms_norm")),
    ("copy / cast", ("copy", "cast", "memcpy", "memset", "fill")),
    ("reduction", ("reduce", "norm")),
)


def _kernel_kind(name: str) -> str:
    """A profiled kernel's kind by its name (first match in KINDS; element-wise otherwise)."""
    low = name.lower()
    return next(
        (kind for kind, keys in KINDS if any(k in low for k in keys)), "element-wise / other"
    )


def _guarded(name: str, fn, args, mbs) -> dict:
    """Run one measurement; free its model before the next (the closures die on return)."""
    try:
        return fn(args, mbs)
    except torch.cuda.OutOfMemoryError:
        return {"impl": name, "micro_batch": mbs, "oom": True}
    except Exception as e:  # one failing stack must not cost the other rows; exit 1 at the end
        print(f"{name} mbs {mbs} failed: {type(e).__name__}: {e}", flush=True)
        return {"impl": name, "micro_batch": mbs, "error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _stacks(args) -> list[tuple[str, object]]:
    """(name, run(args, mbs)) in run order: megabridge first; plain HF before HF + Liger,
    whose kernels patch transformers for the rest of the process."""
    variants = [("megabridge", ())]
    variants += [(f"megabridge-fp8-{r}", (f"model.fp8={r}",)) for r in args.fp8]
    if args.recompute_swiglu:
        variants.append(("megabridge-recompute-swiglu", ("model.recompute_swiglu=true",)))
    for text in args.variant:
        label, _, overrides = text.partition(":")
        if not label or not overrides:
            sys.exit(f"--variant {text!r}: expected LABEL:section.field=value[,...]")
        variants.append((f"megabridge-{label}", tuple(overrides.split(","))))
    stacks = [
        (name, functools.partial(run_megabridge, name=name, overrides=o)) for name, o in variants
    ]
    for text in args.switch:
        labels = tuple(text.split(","))
        unknown = sorted(set(labels) - set(SWITCHES))
        if unknown:
            sys.exit(f"--switch: unknown {', '.join(unknown)}; known: {', '.join(SWITCHES)}")
        name = f"megabridge-{text.replace(',', '+')}"
        stacks.append((name, functools.partial(run_megabridge, name=name, switches=labels)))
    names = [n for n in args.compare.split(",") if n]
    unknown = sorted(set(names) - set(peers.PEERS))
    if unknown:
        sys.exit(f"--compare: unknown {', '.join(unknown)}; known: {', '.join(peers.PEERS)}")
    order = {"hf": 1, "hf-liger": 2}
    for name in sorted(names, key=lambda n: order.get(n, 0)):
        stacks.append((name, functools.partial(run_peer, name)))
    return stacks


def _row(r: dict) -> str:
    if r.get("oom") or r.get("error"):
        why = "out of memory" if r.get("oom") else r["error"][:60]
        return f"{r['impl']:26s} {r['micro_batch']:3d}   {why}"
    run = f"{r['run_tokens_per_s']:10,.0f}" if "run_tokens_per_s" in r else f"{'':10s}"
    return (f"{r['impl']:26s} {r['micro_batch']:3d} {r['step_ms']:8.1f} {r['tokens_per_s']:10,.0f} "
            f"{r['tflops_per_gpu']:8.1f} {r['mfu_989']:8.1%} {r['mfu_ceiling']:8.1%} {r['peak_mem_gib']:8.1f} "
            f"{run}")  # fmt: skip


def ratios(
    results: list[dict], key: str = "tokens_per_s"
) -> dict[tuple[str, str, int], list[float]]:
    """{(megabridge row, other stack, micro-batch): its ``key`` (tokens/s of synchronized steps,
    or run_tokens_per_s: of steps back to back) over the other's, one ratio per round in which
    both ran}. Rows without a round are round 0."""
    ok = {(r["impl"], r["micro_batch"], r.get("round", 0)): r[key] for r in results if key in r}
    out: dict[tuple[str, str, int], list[float]] = {}
    for (ours, mbs, rnd), rate in sorted(ok.items()):
        if not ours.startswith("megabridge"):
            continue
        for other in sorted({i for i, _, _ in ok if i != ours}):
            if (other, mbs, rnd) in ok:
                out.setdefault((ours, other, mbs), []).append(rate / ok[other, mbs, rnd])
    return out


def _print_ratios(results: list[dict], key: str = "tokens_per_s", heading: str = "") -> None:
    """megabridge's tokens/s (``key``) over each other stack's, micro-batch by micro-batch:
    with several rounds, each round's ratio (same-run pairs) and their median."""
    if heading and ratios(results, key):
        print(heading)
    by_pair: dict[tuple[str, str], list[str]] = {}
    for (ours, other, mbs), values in ratios(results, key).items():
        text = f"mbs {mbs}: {values[0]:.3f}x"
        if len(values) > 1:
            each = ", ".join(f"{v:.3f}" for v in values)
            text = f"mbs {mbs}: {statistics.median(values):.3f}x (median of {each})"
        by_pair.setdefault((ours, other), []).append(text)
    for (ours, other), texts in by_pair.items():
        print(f"{ours} / {other}: {'; '.join(texts)}")


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
        "--compare",
        default="",
        help="peers to time too, comma-separated: hf, hf-liger, torchtitan, torchtitan-float8, "
        "torchtitan-float8-rowwise (scripts/performance/peers.py)",
    )
    p.add_argument(
        "--fp8", nargs="*", default=[], choices=("tensorwise", "rowwise"),
        help="also time megabridge with model.fp8 set to each of these",
    )  # fmt: skip
    p.add_argument(
        "--switch", action="append", default=[], metavar="LABEL[,LABEL]",
        help="also time megabridge with these speed-ups on, which are off until measured on a "
        "GPU: first-writes (training/optim.py FirstWrites: the fused weights' gradients "
        "written by a step's first GEMM, not zeroed before it)",
    )  # fmt: skip
    p.add_argument(
        "--recompute-swiglu", action="store_true",
        help="also time megabridge with model.recompute_swiglu=true (required; the default "
        "already recomputes where it applies: a --variant with =false times it off)",
    )  # fmt: skip
    p.add_argument(
        "--variant", action="append", default=[], metavar="LABEL:OVERRIDES",
        help="also time megabridge with these overrides, e.g. "
        "compiled:model.compile_layers=true or fp8c:model.compile_layers=true,model.fp8=tensorwise",
    )  # fmt: skip
    p.add_argument(
        "--sync-check",
        action="store_true",
        help="run two more steps under torch's sync debug mode and print each call that made "
        "the host wait for the GPU (file:line), and the caching allocator's cudaMalloc / "
        "cudaFree counts in them (a cudaFree waits for the device), for every stack",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print two steps' top CUDA kernels, GPU time by kind and where the GPU idled "
        "(waiting for the host, or between kernels it held), for every stack",
    )
    p.add_argument(
        "--rounds", type=int, default=1,
        help="time every stack this many times, one round after another (each round runs all "
        "stacks), and print each round's ratios and their median: two calls' machines differ "
        "by more than 1%%, rounds in one process share the machine",
    )  # fmt: skip
    p.add_argument("--json-out", help="write all results here")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds: expected 1 or more")
    if args.rounds > 1 and "hf" in args.compare.split(","):
        sys.exit("--rounds with hf: Liger's patches to transformers stay in the process, so a "
                 "later round's plain HF would be HF + Liger; time hf in a run of its own")  # fmt: skip
    stacks = _stacks(args)
    if not torch.cuda.is_available():
        sys.exit("train_throughput.py needs a GPU")
    quiet_expected_warnings()
    setup_logging()
    results = []
    for rnd in range(args.rounds):
        for name, fn in stacks:
            for mbs in args.mbs:
                began = time.strftime("%H:%M:%S")
                results.append({**_guarded(name, fn, args, mbs), "round": rnd})
                # printed now: kept even if a later row is cut off
                label = "result:" if args.rounds == 1 else f"result (round {rnd + 1}):"
                print(label, _row(results[-1]), flush=True)
                print(_steps_line(results[-1], began, time.strftime("%H:%M:%S")), flush=True)
    print(
        f"\n{torch.cuda.get_device_name()} | seq {args.seq} | recipe {args.recipe} {' '.join(args.overrides)}"
    )
    print(
        "FLOPs: Megatron-Core's num_floating_point_operations (causal attention, gated MLP, logits)"
    )
    print(f"{'impl':26s} {'mbs':>3s} {'step ms':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU/989':>8s} "
          f"{'MFU/ceil':>8s} {'peak GiB':>8s} {'run tok/s':>10s}")  # fmt: skip
    shown_round = None
    for r in results:
        if args.rounds > 1 and r["round"] != shown_round:
            shown_round = r["round"]
            print(f"round {shown_round + 1}")
        print(_row(r))
    _print_ratios(results, heading="tokens/s of synchronized steps (the median step):")
    _print_ratios(results, "run_tokens_per_s", "tokens/s of steps back to back (run tok/s):")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    if any(r.get("error") for r in results):
        sys.exit("some rows failed (see their lines above)")


if __name__ == "__main__":
    main()
