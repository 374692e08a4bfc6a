"""model.gradient_accumulation_fusion (training/optim.py accumulate_wgrad_in_main_grad): on the
GPU the linears' weight-gradient GEMMs add into DDP's fp32 main_grad themselves. The gradients
it leaves are those of the unfused path (each weight gradient rounded to bf16, then added by
DDP's hook) within that rounding; a gradient added twice or lost would be off by 100%."""

import pytest
import torch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]


def _setup(tmp_path, extra: tuple[str, ...] = ()):
    """(config, loop.setup's result) of the tiny Llama: bf16, mock data, global batches of two
    micro-batches of 2, untied embeddings."""
    from megabridge.recipes import get_recipe
    from megabridge.runtime import seed_everything
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides

    seed_everything(1234)
    cfg = apply_overrides(get_recipe("llama_tiny_pretrain_config"), [
        "model.bf16=true", "dataset.type=mock", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.eval_interval=None",
        "model.share_embeddings_and_output_weights=false",
        f"checkpoint.save={tmp_path / 'ckpt'}", f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard=false", *extra,
    ])  # fmt: skip
    return cfg, loop.setup(cfg)


def _main_grads(tmp_path, fused: bool, extra: tuple[str, ...] = ()):
    from megabridge.training.step import _forward_backward, forward_step

    fusion = f"model.gradient_accumulation_fusion={str(fused).lower()}"
    cfg, s = _setup(tmp_path, (fusion, *extra))
    chunk = s.model[0]
    switched = [
        n for n, m in chunk.named_modules() if getattr(m, "gradient_accumulation_fusion", 0)
    ]
    chunk.zero_grad_buffer()
    for consumed in (0, 4):  # two batches into one buffer: the GEMM adds to what is there
        _forward_backward(cfg, s.model, s.train_data, consumed, False, forward_step)
    grads = {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters()}
    return switched, grads


def test_off_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the CPU case")
    switched, grads = _main_grads(tmp_path, fused=True)
    assert switched == [] and grads  # Megatron's unfused path, untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused GEMM is CUDA's")
@pytest.mark.parametrize(
    "extra", [(), ("model.recompute_swiglu=true",)], ids=["plain", "recompute"]
)
def test_fused_weight_gradients_match_the_unfused_ones_on_cuda(tmp_path, extra):
    """With model.recompute_swiglu, fc2 is models/swiglu_recompute.py's linear, whose
    backward adds its weight gradient into main_grad the same way."""
    switched, fused = _main_grads(tmp_path / "fused", fused=True, extra=extra)
    plain_switched, plain = _main_grads(tmp_path / "plain", fused=False, extra=extra)
    assert plain_switched == []
    # every layer's four linears and the untied output layer
    layers = sum(name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
                 for name in switched)  # fmt: skip
    assert layers >= 4 and any(name.endswith("output_layer") for name in switched), switched
    assert fused.keys() == plain.keys()
    for name, grad in fused.items():
        assert grad.dtype == torch.float32
        scale = plain[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, plain[name], rtol=0.02, atol=0.01 * scale, msg=name)


def _cpu_gemm(out, grad_output, total_input, beta):
    """_FP32Accumulate.gemm's arithmetic where torch's CPU addmm has no out_dtype."""
    product = grad_output.t().float() @ total_input.float()
    if beta == 0.0:
        out.copy_(product)  # out is not read: NaN there stays out of the result
    else:
        out.mul_(beta).add_(product)


def _fused_run(tmp_path, monkeypatch, first_writes: bool, steps: int = 3):
    """main_grad of every parameter after each of ``steps`` global batches of two micro-batches
    with the fused path (on the CPU: forced, its GEMM emulated); before each batch after the
    first, every main_grad is filled with NaN (what the last step left is never zero)."""
    from megabridge.training import optim
    from megabridge.training.step import _forward_backward, forward_step

    if not torch.cuda.is_available():
        monkeypatch.setattr(optim, "_fusion_runs", lambda: True)
        monkeypatch.setattr(optim, "_first_write_works", lambda: True)
        monkeypatch.setattr(optim._FP32Accumulate, "gemm", staticmethod(_cpu_gemm))
    monkeypatch.setattr(optim, "FIRST_WRITES", first_writes)
    cfg, s = _setup(tmp_path)
    chunk = s.model[0]
    assert hasattr(chunk, "first_writes") == first_writes
    params = dict(chunk.named_parameters())
    history = []
    for step in range(steps):
        if step:
            for p in params.values():
                p.main_grad.fill_(float("nan"))
        chunk.zero_grad_buffer()
        _forward_backward(cfg, s.model, s.train_data, step * 4, False, forward_step)
        history.append({n: p.main_grad.detach().clone() for n, p in params.items()})
    return chunk, history


def _same(grad, expected, where) -> None:
    if torch.cuda.is_available():  # cuBLAS may take another kernel for beta 0: fp32 rounding
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=str(where))
    else:
        assert torch.equal(grad, expected), where


def test_first_writes_leave_the_gradients_of_a_zeroed_buffer(tmp_path, monkeypatch):
    """training/optim.py FirstWrites: after the first step the fused weights' main_grads are no
    longer zeroed but written by their first GEMM; the NaN left in them before each step is
    never read, and every gradient equals the zeroing path's exactly (fp32: 0 + x is x)."""
    chunk, written = _fused_run(tmp_path / "first", monkeypatch, first_writes=True)
    _, zeroed = _fused_run(tmp_path / "zeroed", monkeypatch, first_writes=False)
    kept = {id(g) for g in chunk.first_writes.kept}
    names = [n for n, p in chunk.named_parameters() if id(p.main_grad) in kept]
    # each layer's four linears and the output layer; norms and the embedding are zeroed
    assert len(names) == 4 * chunk.module.config.num_layers + 1, names
    assert not any("norm" in n or "embedding" in n for n in names), names
    for step, (ours, theirs) in enumerate(zip(written, zeroed, strict=True)):
        for name, grad in ours.items():
            assert torch.isfinite(grad).all(), (step, name)
            _same(grad, theirs[name], (step, name))


class _Buffer:
    def __init__(self, params):
        self.params = params
        self.grad_data = torch.cat([p.main_grad.view(-1) for p in params])  # (a copy here)


def _param(n: int):
    p = torch.nn.Parameter(torch.zeros(n, 2))
    p.main_grad = torch.zeros(n, 2)
    return p


def test_first_writes_zero_what_no_gemm_wrote_and_learn_only_gemm_written_weights(monkeypatch):
    """On a stand-in DDP chunk: the first step zeroes the whole buffer and learns which
    weights the GEMM wrote and told DDP so (an FP8-like weight whose gradient the hook added is
    not kept); later, a kept weight no GEMM wrote in a step (an expert without tokens) is
    zeroed at finalize, one written twice holds the sum of both products."""
    from megabridge.training import optim

    monkeypatch.setattr(optim._FP32Accumulate, "gemm", staticmethod(_cpu_gemm))
    gemm_a, gemm_b, hooked, both = _param(3), _param(4), _param(2), _param(2)
    buffer = _Buffer([gemm_a, gemm_b, hooked, both])
    chunk = type("Chunk", (), {})()
    chunk.buffers, chunk.expert_parallel_buffers = [buffer], []
    chunk.ddp_config = type("DDP", (), {"reuse_grad_buf_for_mxfp8_param_ag": False})()
    # hooked: a switched FP8 linear; both: a GEMM and DDP's hook add into its main_grad
    optim.FirstWrites.attach(chunk, [gemm_a, gemm_b, hooked, both])

    def backward(*params, told_ddp=True):
        for p in params:
            out = torch.ones(5, p.shape[0], dtype=torch.bfloat16)
            optim._FP32Accumulate.wgrad_gemm_accum_fp32(torch.ones(5, 2), out, p.main_grad)
            p.grad_added_to_main_grad = told_ddp

    for p in (gemm_a, gemm_b, hooked, both):
        p.grad_added_to_main_grad = False
    buffer.grad_data.fill_(7.0)
    buffer.reset()  # learning: upstream's whole-buffer zeroing
    assert torch.equal(buffer.grad_data, torch.zeros_like(buffer.grad_data))
    backward(gemm_a, gemm_b)
    backward(both, told_ddp=False)
    for p in (hooked, both):
        p.main_grad.add_(1.0)  # DDP's hook: grad_added_to_main_grad is False
    optim.FirstWrites.finalize_all([chunk])
    assert {id(g) for g in chunk.first_writes.kept} == {id(gemm_a.main_grad), id(gemm_b.main_grad)}

    for p in (gemm_a, gemm_b, hooked, both):
        p.main_grad.fill_(float("nan"))
    buffer.reset()
    for p in (hooked, both):
        assert torch.equal(p.main_grad, torch.zeros(2, 2))  # zeroed for its hook to add to
    assert torch.isnan(gemm_a.main_grad).all()  # left to its GEMM
    backward(gemm_a, gemm_a)  # two micro-batches: written, then added to
    optim.FirstWrites.finalize_all([chunk])
    assert torch.equal(gemm_a.main_grad, torch.full((3, 2), 10.0))
    assert torch.equal(gemm_b.main_grad, torch.zeros(4, 2))  # no GEMM this step: zeroed
