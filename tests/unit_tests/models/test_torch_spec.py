"""The fast torch spec computes what megatron-core's local (reference) spec computes."""

import pytest
import torch

from megabridge.models import init as weight_init
from megabridge.models.config import ModelConfig
from megabridge.models.provider import build_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]

SHAPES = {
    "llama": dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2),
    "gpt": dict(normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True),
}  # fmt: skip


def _loss(cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_torch_spec_loss_equals_local_spec(shape):
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                vocab_size=128, seq_length=64, bf16=False, **SHAPES[shape])  # fmt: skip
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    fast = _loss(ModelConfig(**base, transformer_impl="torch"), tokens)
    reference = _loss(ModelConfig(**base, transformer_impl="local"), tokens)
    assert fast.shape == reference.shape == (2, 32)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_rope_kernel_matches_megatron_rope():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megabridge.models.triton_kernels import rope_torch

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(16, 2, 4, 8, generator=gen)
    freqs = torch.randn(16, 1, 1, 8, generator=gen)
    torch.testing.assert_close(
        rope_torch(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs), atol=1e-6, rtol=1e-6
    )


# On a GPU (scripts/gpu_smoke.sh runs this file there) also bf16, which takes torch's varlen
# flash kernel; fp32 takes the per-segment SDPA path everywhere.
PACKED_CASES = [("cpu", torch.float32, 1e-6)]
if torch.cuda.is_available():
    PACKED_CASES += [("cuda", torch.float32, 1e-5), ("cuda", torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("device, dtype, atol", PACKED_CASES)
@pytest.mark.parametrize("groups", [4, 2])
def test_packed_attention_does_not_cross_segments(device, dtype, atol, groups):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megabridge.models.provider import transformer_config
    from megabridge.models.torch_layers import SDPAttention

    cfg = transformer_config(
        ModelConfig(
            num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups, bf16=False
        )
    )
    attn = SDPAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 16, generator=gen).to(device, dtype)
    k, v = (torch.randn(10, groups, 16, generator=gen).to(device, dtype) for _ in range(2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6
    )
    # bf16 on a GPU goes through the varlen kernel (if this torch has it, as 2.9+ does)
    assert attn._varlen_ok(q) == (dtype == torch.bfloat16)
    _assert_packed_is_each_segment_alone(attn, q, k, v, params, atol)


def _assert_packed_is_each_segment_alone(attn, q, k, v, params, atol: float) -> None:
    """Packed THD attention [t, n, d] of two segments equals each segment alone (a batch of
    one [s, b=1, n, d]), and attention across the boundary differs (the check can tell)."""
    packed = attn(q, k, v, None, packed_seq_params=params)
    cut = int(params.cu_seqlens_q[1])
    first = attn(q[:cut, None], k[:cut, None], v[:cut, None], None)
    second = attn(q[cut:, None], k[cut:, None], v[cut:, None], None)
    expected = torch.cat([first[:, 0], second[:, 0]])
    torch.testing.assert_close(packed, expected, atol=atol, rtol=atol)
    whole = attn(q[:, None], k[:, None], v[:, None], None)[:, 0]
    assert (whole[cut:] - expected[cut:]).abs().max() > 10 * atol


def test_packed_rope_restarts_positions_in_every_segment():
    """The fused THD RoPE equals RoPE applied to each segment on its own, from position 0."""
    from megabridge.models.torch_layers import rope_thd
    from megabridge.models.triton_kernels import rope_torch

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(10, 4, 8, generator=gen)  # [tokens, heads, dim]
    freqs = torch.randn(7, 1, 1, 6, generator=gen)  # the longest segment's angles, 6 rotated
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty segment in the middle
    got = rope_thd(t, cu, freqs)
    expected = torch.cat([rope_torch(t[:3, None], freqs[:3]), rope_torch(t[3:, None], freqs)])
    torch.testing.assert_close(got, expected[:, 0], atol=0, rtol=0)
    with pytest.raises(Exception, match="cu_seqlens ends at 9"):
        rope_thd(t, torch.tensor([0, 9], dtype=torch.int32), freqs)


@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_attention_sinks_are_transformers_gpt_oss_attention(window, monkeypatch):
    """chunked_attention with sinks (GPT-OSS) is transformers' eager GPT-OSS attention, also
    across chunk boundaries and with a sliding window."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from megabridge.models import torch_layers

    monkeypatch.setattr(torch_layers, "ATTENTION_CHUNK", 4)
    gen = torch.Generator().manual_seed(0)
    s, scale = 11, 8**-0.5
    q = torch.randn(2, 4, s, 8, generator=gen)  # [b, np, s, hn]
    k, v = torch.randn(2, 2, s, 8, generator=gen), torch.randn(2, 2, s, 8, generator=gen)
    sinks = 2.0 * torch.randn(4, generator=gen)
    i = torch.arange(s)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    mask = torch.zeros(s, s).masked_fill(~allowed, float("-inf"))[None, None]
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=2, training=False)
    expected, _ = eager_attention_forward(module, q, k, v, mask, scaling=scale)  # [b, s, np, hn]
    ours = torch_layers.chunked_attention(q, k, v, scale, window, None, 0.0, sinks)
    torch.testing.assert_close(ours.transpose(1, 2), expected, atol=1e-6, rtol=1e-6)
    plain = torch_layers.chunked_attention(q, k, v, scale, window, None, 0.0)
    assert (plain - ours).abs().max() > 1e-2  # the sinks take probability away


def test_yarn_is_transformers_yarn():
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megabridge.models import rope

    params = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "truncate": False, "original_max_position_embeddings": 4096}  # fmt: skip
    for truncate in (False, True):
        hf = GptOssConfig(head_dim=64, rope_parameters={**params, "truncate": truncate})
        expected, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        ours = rope.inv_freq(64, 150000.0, {**params, "truncate": truncate})
        torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)
        assert rope.yarn_attention_factor(params) == pytest.approx(factor, rel=1e-12)


def test_gpt_oss_layers_backward():
    """Gradients reach the sinks and the experts' biases (Megatron-Core adds an expert's
    scaled bias in place, which autograd refused on the row-parallel output as is)."""
    from megabridge.conversion.registry import bridge_for_family
    from megabridge.conversion.tiny import tiny_config

    cfg = bridge_for_family("gpt_oss").model_config(tiny_config("gpt_oss"))
    cfg.bf16 = False
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for part in ("core_attention.softmax_offset", "linear_fc2.bias", "linear_fc1.bias"):
        names = [n for n in grads if n.endswith(part)]
        assert names and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in names), part


def _llama4_attention(groups: int, **options):
    from megabridge.models.provider import transformer_config
    from megabridge.models.torch_layers import SDPAttention

    cfg = transformer_config(
        ModelConfig(
            num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups, bf16=False
        )
    )
    return SDPAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self", **options)


def test_chunked_attention_is_causal_within_blocks():
    """Blocks of 3 over 8 tokens (the last one short) equal masked attention with
    transformers' chunked mask: j <= i and i // 3 == j // 3."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, 4, 16, generator=gen) for _ in range(3))  # [s, b, n, hn]
    got = _llama4_attention(4, chunk_size=3)(q, k, v, None)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    allowed = (j <= i) & (i // 3 == j // 3)
    scores = torch.einsum("ibnd,jbnd->bnij", q, k) / 4.0
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = torch.einsum("bnij,jbnd->ibnd", probs, v).reshape(8, 2, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    plain = _llama4_attention(4)(q, k, v, None)
    assert (plain - expected).abs().max() > 1e-2  # the blocks change the result


@pytest.mark.parametrize("device, dtype, atol", PACKED_CASES)
def test_packed_llama4_attention_restarts_chunks_and_temperature_per_segment(device, dtype, atol):
    """Packed: chunks start at each segment's start, the temperature's positions restart at 0,
    and the QK norm is per token; on a GPU in bf16 through the varlen kernel."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _llama4_attention(2, chunk_size=3, qk_l2_norm_eps=1e-5, temperature=(2, 0.5))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(11, 4, 16, generator=gen).to(device, dtype)
    k, v = (torch.randn(11, 2, 16, generator=gen).to(device, dtype) for _ in range(2))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7
    )
    _assert_packed_is_each_segment_alone(attn, q, k, v, params, atol)
