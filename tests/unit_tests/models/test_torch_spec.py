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

    from megabridge.models.torch_layers import _rope_bshd

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(16, 2, 4, 8, generator=gen)
    freqs = torch.randn(16, 1, 1, 8, generator=gen)
    torch.testing.assert_close(
        _rope_bshd(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs), atol=1e-6, rtol=1e-6
    )


def test_packed_attention_does_not_cross_segments():
    from megatron.core.packed_seq_params import PackedSeqParams

    from megabridge.models.provider import transformer_config
    from megabridge.models.torch_layers import SDPAttention

    cfg = transformer_config(
        ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, bf16=False)
    )
    attn = SDPAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, 4, 8, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    packed = attn(
        q,
        k,
        v,
        None,
        packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu),
    )
    # each segment alone, as a batch of one [s, b=1, n, d]
    first = attn(q[:4, None], k[:4, None], v[:4, None], None)
    second = attn(q[4:, None], k[4:, None], v[4:, None], None)
    torch.testing.assert_close(packed, torch.cat([first[:, 0], second[:, 0]]), atol=1e-6, rtol=1e-6)
