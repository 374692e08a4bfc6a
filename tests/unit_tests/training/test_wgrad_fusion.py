"""model.gradient_accumulation_fusion (training/optim.py accumulate_wgrad_in_main_grad): on the
GPU the linears' weight-gradient GEMMs add into DDP's fp32 main_grad themselves. The gradients
it leaves are those of the unfused path (each weight gradient rounded to bf16, then added by
DDP's hook) within that rounding; a gradient added twice or lost would be off by 100%."""

import pytest
import torch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]


def _main_grads(tmp_path, fused: bool, extra: tuple[str, ...] = ()):
    from megabridge.recipes import get_recipe
    from megabridge.runtime import seed_everything
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides
    from megabridge.training.step import _forward_backward, forward_step

    seed_everything(1234)
    cfg = apply_overrides(get_recipe("llama_tiny_pretrain_config"), [
        "model.bf16=true", "dataset.type=mock", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.eval_interval=None",
        "model.share_embeddings_and_output_weights=false",
        f"model.gradient_accumulation_fusion={str(fused).lower()}",
        f"checkpoint.save={tmp_path / 'ckpt'}", f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard=false", *extra,
    ])  # fmt: skip
    s = loop.setup(cfg)
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
