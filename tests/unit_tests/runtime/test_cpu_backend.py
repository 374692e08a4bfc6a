"""Each test names the megatron-core 0.16 CUDA assumption that runtime.enable_cpu_backend handles."""

import pytest
import torch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]


def test_factory_calls_with_cuda_device_land_on_cpu():
    # e.g. optimizer.py: torch.tensor([1.0], device='cuda'); p2p: device=current_device()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"


def test_default_causal_mask_is_built_on_cpu():
    # transformer/utils.py: torch.triu(torch.ones(sq, sq, device="cuda"), diagonal=1)
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert mask.tolist()[0] == [False, True, True, True]


def test_rotary_inv_freq_moves_to_cpu():
    # rotary_pos_embedding.py: self.inv_freq.to(device=torch.cuda.current_device())
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    out = emb(6)
    assert out.device.type == "cpu" and out.shape == (6, 1, 1, 8)


def test_tensor_type_reports_cuda_names_for_megatron_checks():
    # clip_grads.py: assert param.grad.type() == 'torch.cuda.FloatTensor'
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # an explicit conversion still converts
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_clip_grads_runs_on_cpu_and_clips():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    norm = get_grad_norm_fp32([p.grad])
    assert norm == pytest.approx(6.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=norm)
    assert torch.linalg.norm(p.grad).item() == pytest.approx(1.0, rel=1e-4)


def test_fp32_optimizer_scale_tensor_on_cpu():
    # optimizer.py FP32Optimizer: self._scale = torch.tensor([1.0], device='cuda')
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    p = torch.nn.Parameter(torch.ones(2))
    opt = FP32Optimizer(torch.optim.SGD([p], lr=0.1), OptimizerConfig(lr=0.1), lambda *_: None)
    assert opt.get_loss_scale().device.type == "cpu"


def test_rng_tracker_forks_a_separate_reproducible_stream():
    # random.py: the tracker saves/restores torch.cuda RNG state around fork()
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default stream"
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(a, b)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        c = torch.rand(3)
    assert not torch.equal(b, c), "the forked stream advances"


def test_current_device_and_synchronize_answer_on_cpu():
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()  # no error


def test_cuda_streams_and_events_are_no_ops():
    # moe/token_dispatcher.py: a side stream for the host copies, an event to wait on them
    stream = torch.cuda.Stream()
    if torch.cuda.current_stream() != stream:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        x = torch.ones(2)
    stream.record_event().synchronize()
    assert x.sum().item() == 2.0


def test_moe_all_to_all_split_sizes_become_numpy():
    # token_dispatcher.py: maybe_move_tensor_to_cpu(splits, as_numpy=True) for all_to_all_single
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert list(splits) == [3, 1] and not torch.is_tensor(splits)
    counts = torch.tensor([2, 2])
    assert token_dispatcher.maybe_move_tensor_to_cpu(counts) is counts
