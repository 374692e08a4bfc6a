"""scripts/performance/train_throughput.py's arithmetic on hand-made inputs (its runs need a
GPU): the idle-gap analysis of --profile, and the same-round ratios of --rounds."""

import pytest

from tests.helpers import performance_script

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def throughput():
    return performance_script("train_throughput")


def test_gaps_are_summed_and_grouped_by_the_ops_around_them(throughput):
    timeline = [  # (name, start us, duration us), out of order as streams interleave
        ("norm", 200.0, 10.0),
        ("gemm", 0.0, 100.0),
        ("copy", 100.0, 5.0),  # 0 us after gemm: no gap
        ("norm", 250.0, 10.0),  # 40 us after the first norm
        ("copy", 130.0, 10.0),  # 25 us after the first copy
        ("norm", 300.0, 10.0),  # 40 us after the second norm
        ("gemm", 320.0, 5.0),  # 10 us: under the threshold
    ]
    idle, top = throughput.gpu_idle_gaps(timeline, min_gap_us=20.0)
    assert idle == pytest.approx(25 + 60 + 40 + 40)
    assert top == [
        ("norm", "norm", 2, pytest.approx(80.0)),
        ("copy", "norm", 1, pytest.approx(60.0)),
        ("copy", "copy", 1, pytest.approx(25.0)),
    ]


def test_overlapping_activities_leave_no_gap_and_the_last_to_end_precedes_one(throughput):
    timeline = [
        ("allreduce", 0.0, 500.0),  # another stream, running under the kernels
        ("gemm", 10.0, 100.0),
        ("add", 200.0, 10.0),
        ("adam", 600.0, 10.0),
    ]
    idle, top = throughput.gpu_idle_gaps(timeline, min_gap_us=20.0)
    assert idle == pytest.approx(100.0)
    assert top == [("allreduce", "adam", 1, pytest.approx(100.0))]


def test_top_keeps_the_costliest_pairs(throughput):
    timeline = [(f"k{i}", i * 100.0, 50.0 - i) for i in range(6)]
    _, top = throughput.gpu_idle_gaps(timeline, min_gap_us=20.0, top=2)
    assert [(p, n) for p, n, _, _ in top] == [("k4", "k5"), ("k3", "k4")]


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
