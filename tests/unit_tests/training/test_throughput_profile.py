"""scripts/performance/train_throughput.py's arithmetic on hand-made inputs (its runs need a
GPU): the idle analysis of --profile, the call sites of --sync-check, and the same-round
ratios of --rounds."""

import json
import traceback
import warnings

import pytest
import torch

from tests.helpers import performance_script

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def throughput():
    return performance_script("train_throughput")


def _op(name, ts, dur, ext, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": tid, "ts": ts,
            "dur": dur, "args": {"External id": ext}}  # fmt: skip


def _launch(ts, dur, corr, ext, cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "pid": 1, "tid": 1, "ts": ts,
            "dur": dur, "args": {"External id": ext, "correlation": corr}}  # fmt: skip


def _kernel(name, ts, dur, corr, ext, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur,
            "args": {"External id": ext, "correlation": corr, "stream": 7}}  # fmt: skip


def test_the_timeline_links_each_kernel_to_its_launch_and_outermost_host_op(throughput):
    trace = [
        _op("autograd::engine::evaluate_function: MmBackward0", 0.0, 100.0, 1),
        _op("MmBackward0", 1.0, 98.0, 2),
        _op("aten::mm", 10.0, 50.0, 3),
        _launch(20.0, 5.0, 501, 3),
        _op("aten::add_", 200.0, 20.0, 4),  # top level: named alone
        {**_op("aten::empty", 250.0, 1.0, 0), "args": {}},  # no External id: names nothing
        _launch(205.0, 5.0, 502, 4),
        _launch(300.0, 4.0, 503, 0, cat="cuda_driver"),  # a Triton launch, no op around it
        _kernel("void at::native::vectorized_elementwise_kernel<4, at::X>(int)", 400.0, 3.0, 502, 4),
        _kernel("nvjet_tst_128x256_NTN", 30.0, 300.0, 501, 3),
        _kernel("_rms_norm_fwd", 410.0, 8.0, 503, 0),
        _kernel("Memset (Device)", 420.0, 1.0, 504, 0, cat="gpu_memset"),  # no launch traced
        {**_kernel("Memcpy HtoD (Pinned -> Device)", 430.0, 1.0, 505, 0, cat="gpu_memcpy"),
         "args": {"correlation": 505}},  # no External id
        {"ph": "X", "cat": "gpu_user_annotation", "name": "Optimizer.step", "ts": 0.0, "dur": 900.0,
         "args": {"correlation": 501}},  # spans kernels: not one of its own
    ]  # fmt: skip
    timeline = sorted(throughput.gpu_timeline(trace), key=lambda row: row[1])
    assert timeline == [
        ("nvjet_tst_128x256_NTN", 30.0, 300.0, 25.0,
         "autograd::engine::evaluate_function: MmBackward0 > aten::mm"),
        ("vectorized_elementwise_kernel<4>", 400.0, 3.0, 210.0, "aten::add_"),
        ("_rms_norm_fwd", 410.0, 8.0, 304.0, ""),
        ("Memset", 420.0, 1.0, None, ""),
        ("Memcpy HtoD", 430.0, 1.0, None, ""),
    ]  # fmt: skip


def test_idle_stretches_are_split_by_cause_and_size(throughput):
    timeline = [  # (name, start us, duration us, its launch's end us, host op)
        ("gemm", 0.0, 100.0, -50.0, "mm"),
        ("add", 102.0, 10.0, 50.0, "add"),  # 2 us after gemm, launched long before: queued
        ("norm", 120.0, 10.0, 119.0, "norm"),  # 8 us, launched after add ended: host late
        ("adam", 200.0, 10.0, 195.0, "step > adam"),  # 70 us, host late
        ("adam", 240.0, 10.0, 205.0, "step > adam"),  # 30 us, queued
        ("memset", 252.0, 1.0, None, ""),  # 2 us, no launch traced
    ]
    idle = throughput.idle_by_cause(timeline)
    assert idle["activities"] == 6
    assert idle["span_us"] == pytest.approx(253.0)
    assert idle["idle_us"] == pytest.approx(2 + 8 + 70 + 30 + 2)
    assert idle["cells"] == {
        ("queued", 0): [1, pytest.approx(2.0)],
        ("host late", 1): [1, pytest.approx(8.0)],
        ("host late", 2): [1, pytest.approx(70.0)],
        ("queued", 2): [1, pytest.approx(30.0)],
        ("unknown", 0): [1, pytest.approx(2.0)],
    }
    assert idle["top"][:2] == [
        ("norm [norm]", "adam [step > adam]", 1, pytest.approx(70.0), pytest.approx(70.0)),
        ("adam [step > adam]", "adam [step > adam]", 1, pytest.approx(30.0), 0.0),
    ]


def test_overlapping_activities_leave_no_gap_and_the_last_to_end_precedes_one(throughput):
    timeline = [
        ("allreduce", 0.0, 500.0, 0.0, ""),  # another stream, running under the kernels
        ("gemm", 10.0, 100.0, 0.0, ""),
        ("add", 200.0, 10.0, 0.0, ""),
        ("adam", 600.0, 10.0, 0.0, ""),
    ]
    idle = throughput.idle_by_cause(timeline)
    assert idle["idle_us"] == pytest.approx(100.0)
    assert idle["span_us"] == pytest.approx(610.0)
    assert idle["top"] == [("allreduce", "adam", 1, pytest.approx(100.0), 0.0)]


def test_top_keeps_the_costliest_pairs(throughput):
    timeline = [(f"k{i}", i * 100.0, 50.0 - i, 0.0, "") for i in range(6)]
    top = throughput.idle_by_cause(timeline, top=2)["top"]
    assert [(p, n) for p, n, *_ in top] == [("k4", "k5"), ("k3", "k4")]


def test_the_idle_table_prints_per_step(throughput, capsys):
    timeline = [("gemm", 0.0, 100.0, 0.0, ""), ("norm", 140.0, 60.0, 120.0, "op")]
    throughput.print_idle("mb", throughput.idle_by_cause(timeline), wall_ms=0.2, steps=2)
    out = capsys.readouterr().out
    assert "GPU span 0.1 = busy 0.1 + idle 0.0 ms, 1 GPU activities" in out
    assert "host late" in out and "queued" not in out
    assert "0.02 ( 0.02)    0.5x  gemm  ->  norm [op]" in out


def test_host_ops_are_read_from_a_real_profiler_trace(throughput, tmp_path):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(4, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.linear(x, x)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    names = throughput._host_ops(json.loads((tmp_path / "trace.json").read_text())["traceEvents"])
    assert "aten::linear" in names.values()
    assert "aten::linear > aten::mm" in names.values()


@pytest.mark.parametrize(
    "name, short",
    [
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>,"
         " std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)",
         "vectorized_elementwise_kernel<4>"),
        ("Memcpy DtoD (Device -> Device)", "Memcpy DtoD"),
        ("void (anonymous namespace)::elementwise_kernel_with_index<int, at::native::(anonymous"
         " namespace)::arange_cuda_out(...)::{lambda(int)#1}>(int, ...)", "elementwise_kernel_with_index<int>"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
         "ncclDevKernel_AllReduce_Sum_f32_RING_LL"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN"),
    ],
)  # fmt: skip
def test_kernel_names_are_shortened(throughput, name, short):
    assert throughput._short_kernel_name(name) == short


def test_ratios_pair_rows_of_the_same_round_and_micro_batch(throughput):
    rows = [
        {"impl": "megabridge", "micro_batch": 16, "tokens_per_s": 110.0, "round": 0},
        {"impl": "hf-liger", "micro_batch": 16, "tokens_per_s": 100.0, "round": 0},
        {"impl": "megabridge", "micro_batch": 16, "tokens_per_s": 99.0, "round": 1},
        {"impl": "hf-liger", "micro_batch": 16, "tokens_per_s": 90.0, "round": 1},
        {"impl": "megabridge", "micro_batch": 8, "tokens_per_s": 80.0, "round": 1},  # no pair
        {"impl": "hf-liger", "micro_batch": 8, "oom": True, "round": 1},
        {"impl": "megabridge", "micro_batch": 16, "tokens_per_s": 50.0, "round": 2},
    ]
    assert throughput.ratios(rows) == {
        ("megabridge", "hf-liger", 16): [pytest.approx(1.1), pytest.approx(1.1)]
    }
    # rows from before rounds existed (no "round") pair as one round
    single = [{k: v for k, v in r.items() if k != "round"} for r in rows[:2]]
    assert throughput.ratios(single) == {("megabridge", "hf-liger", 16): [pytest.approx(1.1)]}


def test_ratios_print_each_round_and_the_median(throughput, capsys):
    rows = [
        {"impl": "megabridge", "micro_batch": 16, "tokens_per_s": rate, "round": i}
        for i, rate in enumerate((113.0, 116.0, 114.0))
    ] + [
        {"impl": "torchtitan", "micro_batch": 16, "tokens_per_s": 100.0, "round": i}
        for i in range(3)
    ]
    throughput._print_ratios(rows)
    assert capsys.readouterr().out.strip() == (
        "megabridge / torchtitan: mbs 16: 1.140x (median of 1.130, 1.160, 1.140)"
    )


def test_steps_are_timed_synchronized_then_back_to_back(throughput, monkeypatch):
    # A fake clock: each step takes 10 s of host time plus 3 s that only a synchronization
    # waits for (the GPU's tail); back to back, the tail of one step hides under the next.
    clock = {"now": 0.0, "pending": 0.0}

    def step(i):
        clock["now"] += 10.0  # the host does not wait for the GPU
        clock["pending"] = 3.0
        seen.append(i)

    def synchronize():
        clock["now"] += clock["pending"]
        clock["pending"] = 0.0

    seen = []
    monkeypatch.setattr(throughput.torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock["now"])
    times, run = throughput._time_steps(step, warmup=2, iters=3)
    assert seen == list(range(8))  # warmup, the synchronized steps, then new indexes
    assert times == [13.0, 13.0, 13.0]
    assert run == pytest.approx((3 * 10.0 + 3.0) / 3)


def test_ratios_of_run_tokens_pair_like_the_synchronized_ones(throughput, capsys):
    rows = [
        {"impl": "megabridge", "micro_batch": 16, "tokens_per_s": 110.0, "run_tokens_per_s": 120.0},
        {"impl": "hf-liger", "micro_batch": 16, "tokens_per_s": 100.0, "run_tokens_per_s": 100.0},
    ]
    assert throughput.ratios(rows, "run_tokens_per_s") == {
        ("megabridge", "hf-liger", 16): [pytest.approx(1.2)]
    }
    throughput._print_ratios(rows, "run_tokens_per_s", "back to back:")
    assert capsys.readouterr().out.strip() == "back to back:\nmegabridge / hf-liger: mbs 16: 1.200x"


def _waits_for_the_gpu():
    warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)


def test_synchronizing_warnings_are_counted_by_their_call_site(throughput, capsys):
    with pytest.warns(UserWarning, match="something else"):  # passed on, not counted
        with throughput.synchronizing_sites() as sites:
            for _ in range(4):
                _waits_for_the_gpu()
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert sum(sites.values()) == 4 and len(sites) == 1
    site = next(iter(sites))
    innermost, caller = site.split(" < ")[:2]
    assert (
        innermost.startswith("training/test_throughput_profile.py:")
        and "_waits_for_the_gpu" in innermost
    )
    assert "test_synchronizing_warnings_are_counted_by_their_call_site" in caller
    throughput.print_sites("mb", sites, steps=2)
    assert f"     2.0x  {site}" in capsys.readouterr().out


def test_call_sites_leave_torch_and_the_warnings_module_out(throughput):
    frames = [
        traceback.FrameSummary("/x/megatron/core/schedules.py", 10, "forward_step"),
        traceback.FrameSummary("/x/megabridge/training/step.py", 64, "train_step"),
        traceback.FrameSummary("/site/torch/_tensor.py", 1000, "tolist"),
        traceback.FrameSummary("/usr/lib/python3.12/warnings.py", 50, "_showwarnmsg"),
    ]
    assert throughput.call_site(frames, frames=2) == (
        "training/step.py:64 train_step < core/schedules.py:10 forward_step"
    )


def test_the_sync_check_runs_two_steps_in_the_debug_mode_and_restores_it(
    throughput, monkeypatch, capsys
):
    modes, steps = [], []
    stats = iter([{"num_device_free": 3}, {"num_device_free": 5, "num_device_alloc": 1}])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: next(stats))

    def step(i):
        steps.append((i, list(modes)))
        _waits_for_the_gpu()

    args = type("Args", (), {"profile": False, "sync_check": True})()
    throughput._inspect(step, "mb", args)
    assert steps == [(0, ["warn"]), (1, ["warn"])] and modes == ["warn", "default"]
    out = capsys.readouterr().out
    assert "mb: calls that made the host wait" in out and "1.0x  training/test_throughput" in out
    assert "num_device_alloc +1, num_device_free +2, num_alloc_retries +0" in out


def test_switches_add_megabridge_rows_with_module_constants_on_for_the_row(throughput):
    from megabridge.training import optim

    args = type("Args", (), {"fp8": [], "recompute_swiglu": False, "compare": "torchtitan",
                             "variant": [], "switch": ["first-writes"]})()  # fmt: skip
    stacks = throughput._stacks(args)
    assert [name for name, _ in stacks] == ["megabridge", "megabridge-first-writes", "torchtitan"]
    assert stacks[1][1].keywords["switches"] == ("first-writes",)
    assert "switches" not in stacks[0][1].keywords
    assert not optim.FIRST_WRITES
    with throughput.switched_on(("first-writes",)):
        assert optim.FIRST_WRITES
    assert not optim.FIRST_WRITES
    args.switch = ["first-writes,fast"]
    with pytest.raises(SystemExit, match="unknown fast"):
        throughput._stacks(args)


def test_steps_line_names_the_row_its_wall_clock_and_each_step(throughput):
    row = {"impl": "megabridge", "micro_batch": 16, "steps_ms": [401.26, 399.0]}
    line = throughput._steps_line(row, "14:00:01", "14:00:55")
    assert line == "  megabridge mbs 16: 14:00:01-14:00:55, steps ms 401.3 399.0"
    failed = {"impl": "hf-liger", "micro_batch": 16, "oom": True}
    assert throughput._steps_line(failed, "a", "b").endswith("steps ms -")


def test_steps_line_adds_the_gpus_clock_and_power_where_sampled(throughput):
    row = {"impl": "megabridge", "micro_batch": 16, "steps_ms": [400.0],
           "clocks": {"samples": 40, "sm_mhz": 1477.4, "power_w": 692.2, "capped": 1.0}}  # fmt: skip
    line = throughput._steps_line(row, "14:00:01", "14:00:55")
    assert line.endswith("steps ms 400.0; SM 1477 MHz, 692 W, power cap in 100% of 40 samples")
