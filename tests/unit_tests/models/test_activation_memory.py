"""What autograd keeps for backward (models/activation_memory.py), and the options that keep
less without changing the math: the norms' outputs recomputed (models/norm_recompute.py), the
SwiGLU output recomputed (models/swiglu_recompute.py), the loss keeping the logits instead of
an fp32 softmax (models/cross_entropy.py), and K/V not keeping the fused QKV output alive."""

import pytest
import torch

from megabridge.errors import ConfigError
from megabridge.models import init as weight_init
from megabridge.models.activation_memory import SavedTensorLog, outside_layers_bytes
from megabridge.models.config import ModelConfig
from megabridge.models.provider import build_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]

H, F, V, LAYERS, B, S = 64, 128, 256, 2, 2, 16
NORMS = dict(recompute_modules=["layernorm"])  # selective recompute, implied


def _cfg(**kw) -> ModelConfig:
    kw = dict(num_layers=LAYERS, hidden_size=H, ffn_hidden_size=F, num_attention_heads=4,
              num_query_groups=2, vocab_size=V, seq_length=S, bf16=False,
              transformer_impl="torch", share_embeddings_and_output_weights=False,
              recompute_swiglu=False) | kw  # fmt: skip
    return ModelConfig(**kw)


def _run(cfg: ModelConfig):
    """(saved-tensor log of the forward, loss, gradients) of one step of ``cfg``'s model."""
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=3)
    tokens = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(S).expand(B, -1)
    with SavedTensorLog(model) as log:
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
    # A per-token weighting, as the training step's loss mask gives.
    weights = torch.linspace(0.5, 1.5, B * S).view(B, S)
    (loss.float() * weights).sum().backward()
    return log, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_math(a, b):
    _, loss, grads = a
    _, ref_loss, ref_grads = b
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


def _module_bytes(log, suffix: str) -> int:
    return sum(b for m, b in log.bytes_by_module().items() if m.endswith(suffix))


def test_recomputed_norms_keep_no_norm_output_and_the_same_math():
    """Bit-equal in bf16, where the norm's input has one consumer inside the norm (the fp32
    cast; on CUDA the fused kernel is one autograd node). The CPU's fp32 rms_norm is composite:
    its input feeds two nodes, and three gradient terms (those two and the residual) are
    summed in another order when the norm's backward runs inside the recomputation."""
    today, lean = _run(_cfg(bf16=True)), _run(_cfg(bf16=True, **NORMS))
    _assert_same_math(lean, today)
    per_layer = B * S * LAYERS
    # Today QKV and fc1 each keep their input, the norm's output (h bf16 values per token).
    assert _module_bytes(today[0], "linear_qkv") == _module_bytes(today[0], "linear_fc1")
    assert _module_bytes(today[0], "linear_fc1") == H * 2 * per_layer
    assert _module_bytes(lean[0], "linear_qkv") == _module_bytes(lean[0], "linear_fc1") == 0
    assert today[0].total_bytes() - lean[0].total_bytes() >= 2 * H * 2 * per_layer
    _, loss, grads = _run(_cfg(**NORMS))
    _, ref_loss, ref_grads = _run(_cfg())
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_recomputed_norms_in_an_moe_layer_keep_the_math():
    """The pre-MLP norm feeds the router and the experts (and a shared expert) there."""
    moe = dict(num_moe_experts=4, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
               moe_layer_freq=[0, 1], bf16=True)  # fmt: skip
    today, lean = _run(_cfg(**moe)), _run(_cfg(**moe, **NORMS))
    _assert_same_math(lean, today)
    # Both norms of both layers: h bf16 values per token each, no longer kept.
    assert today[0].total_bytes() - lean[0].total_bytes() >= 2 * H * 2 * B * S * LAYERS


@pytest.mark.parametrize("setting", [True, None], ids=["true", "default"])
def test_recomputed_swiglu_drops_its_output_from_what_is_kept(setting):
    today, lean = _run(_cfg()), _run(_cfg(recompute_swiglu=setting))
    # fc2's input, SwiGLU's output [tokens, f], is no longer kept.
    assert today[0].total_bytes() - lean[0].total_bytes() >= F * 4 * B * S * LAYERS


def test_attention_keeps_k_and_v_not_the_whole_qkv_output():
    """Without RoPE and with as many groups as heads, Q, K and V are all slices of the fused
    QKV output (with RoPE and fewer groups, V is): attention keeps copies of them."""
    log, _, _ = _run(_cfg(num_query_groups=4, position_embedding_type="none"))
    for s in log.saved.values():
        if s.module.endswith("core_attention") and s.dtype == torch.float32 and len(s.shape) == 4:
            assert s.nbytes == torch.Size(s.shape).numel() * 4, s.shape  # no bigger storage


def test_the_loss_keeps_the_logits_and_gives_the_same_math():
    # Megatron-Core's cross entropy (the default until 2026-12-04) against the logits-keeping one
    megatron_ce = dict(recompute_cross_entropy=False)
    today, lean = _run(_cfg(**megatron_ce)), _run(_cfg(recompute_cross_entropy=True))
    _assert_same_math(lean, today)
    bf16_today = outside_layers_bytes(_run(_cfg(bf16=True, **megatron_ce))[0])["(model: loss)"]
    bf16_lean = outside_layers_bytes(_run(_cfg(bf16=True, recompute_cross_entropy=True))[0])
    tokens = B * S
    assert bf16_today >= V * 4 * tokens  # an fp32 softmax [tokens, V]
    assert bf16_lean["(model: loss)"] <= V * 2 * tokens + 32 * tokens  # bf16 logits + per row


def test_norms_and_loss_together_keep_the_math():
    """(recompute_swiglu writes SwiGLU's backward out, so its gradients are equal to ~1e-6,
    not bitwise: test_torch_spec_speed_options.py.)"""
    options = dict(recompute_cross_entropy=True, **NORMS)
    plain = _run(_cfg(bf16=True, recompute_cross_entropy=False))
    _assert_same_math(_run(_cfg(bf16=True, **options)), plain)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(NORMS, recompute_granularity="full"), "for recompute_granularity=selective, not"),
        (dict(NORMS, recompute_modules=["moe_act"]), r"\['moe_act'\] are not among"),
        (dict(NORMS, compile_layers=True), "layernorm] with compile_layers is not supported"),
        (dict(NORMS, fp8="tensorwise"), r"layernorm\] with model.fp8 is not supported yet"),
        (dict(NORMS, transformer_impl="local"), "not supported yet by the local spec"),
    ],
)
def test_recompute_modules_refused_where_they_do_not_apply(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_model(_cfg(**fields), meta=True)
