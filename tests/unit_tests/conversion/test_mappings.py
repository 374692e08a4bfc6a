import pytest
import torch

from megabridge.conversion import blocks, sharding
from megabridge.conversion.mappings import QKV, FusedQKV, GatedMLP, Rename
from megabridge.models.config import ModelConfig

pytestmark = pytest.mark.unit


def _cfg(heads=4, groups=2, hidden=16):
    return ModelConfig(num_attention_heads=heads, num_query_groups=groups, hidden_size=hidden)


def test_patterns_fill_layer_and_expert_indices():
    m = Rename("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
               "model.layers.*.experts.*.w1.weight")  # fmt: skip
    assert m.match("decoder.layers.3.mlp.experts.local_experts.12.linear_fc1.weight") == (
        "model.layers.3.experts.12.w1.weight",
    )
    assert m.match("decoder.layers.3.mlp.linear_fc1.weight") is None


def test_qkv_interleaves_by_query_group():
    cfg = _cfg(heads=4, groups=2, hidden=8)  # head dim 2, 2 query heads per group
    d = 2
    q = torch.arange(4 * d).float().repeat_interleave(8).view(4 * d, 8)
    k = 100 + torch.arange(2 * d).float().repeat_interleave(8).view(2 * d, 8)
    v = 200 + torch.arange(2 * d).float().repeat_interleave(8).view(2 * d, 8)
    fused = QKV("x", ("q", "k", "v")).hf_to_megatron([q, k, v], cfg)
    rows = fused[:, 0].tolist()
    # group 0: q heads 0,1 (rows 0-3), k head 0 (100,101), v head 0 (200,201); then group 1
    assert rows == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_round_trip_is_exact(heads, groups):
    cfg = _cfg(heads, groups, hidden=32)
    d = 32 // heads
    tensors = [torch.randn(heads * d, 32), torch.randn(groups * d, 32), torch.randn(groups * d, 32)]
    m = QKV("x", ("q", "k", "v"))
    back = m.megatron_to_hf(m.hf_to_megatron(tensors, cfg), cfg)
    for a, b in zip(tensors, back, strict=True):
        assert torch.equal(a, b)
    biases = [t[:, 0].clone() for t in tensors]
    assert all(
        torch.equal(a, b)
        for a, b in zip(biases, m.megatron_to_hf(m.hf_to_megatron(biases, cfg), cfg), strict=True)
    )


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2)])
def test_fused_qkv_is_qkv_of_its_row_blocks_and_round_trips(heads, groups):
    cfg = _cfg(heads, groups, hidden=32)
    d = 32 // heads
    q, k, v = torch.randn(heads * d, 32), torch.randn(groups * d, 32), torch.randn(groups * d, 32)
    fused_hf = torch.cat([q, k, v])  # Phi-3's qkv_proj: all q rows, then k, then v
    m = FusedQKV("x", ("qkv",))
    megatron = m.hf_to_megatron([fused_hf], cfg)
    assert torch.equal(megatron, QKV("x", ("q", "k", "v")).hf_to_megatron([q, k, v], cfg))
    (back,) = m.megatron_to_hf(megatron, cfg)
    assert torch.equal(back, fused_hf)


@pytest.mark.parametrize(
    "mapping, heads, groups",
    [(QKV("x", ("q", "k", "v")), 4, 4), (QKV("x", ("q", "k", "v")), 8, 2),
     (FusedQKV("x", ("qkv",)), 4, 2), (GatedMLP("x", ("g", "u")), 4, 2)],
)  # fmt: skip
def test_views_read_in_order_are_the_hf_tensors(mapping, heads, groups):
    """What a repeated weight sync copies from: views of the Megatron tensor where the mapping
    allows (QKV's q/k/v and gate/up), the HF tensor's elements in row-major order."""
    cfg = _cfg(heads, groups, hidden=32)
    rows = 96 if isinstance(mapping, GatedMLP) else (heads + 2 * groups) * (32 // heads)
    megatron = torch.randn(rows, 32)
    exact = mapping.megatron_to_hf(megatron, cfg)
    views = mapping.megatron_to_hf_views(megatron, cfg)
    assert len(views) == len(exact)
    for view, hf in zip(views, exact, strict=True):
        assert torch.equal(view.reshape(hf.shape), hf)
        shares = view.untyped_storage().data_ptr() == megatron.untyped_storage().data_ptr()
        assert shares != isinstance(mapping, FusedQKV)  # FusedQKV's concatenation is a copy


def test_gated_mlp_round_trip_and_tp_split():
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    m = GatedMLP("x", ("g", "u"))
    fused = m.hf_to_megatron([gate, up], None)
    assert all(
        torch.equal(a, b) for a, b in zip(m.megatron_to_hf(fused, None), [gate, up], strict=True)
    )
    # TP rank r holds [gate_r; up_r], so the activation pairs the right rows
    local = sharding.split(fused, "gated_dim0", rank=1, size=2)
    assert torch.equal(local, torch.cat([gate[4:], up[4:]]))


def test_split_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        sharding.split(torch.zeros(5, 2), "dim0", 0, 2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_stacked_experts_slice_interleave_and_round_trip(interleaved):
    from megabridge.conversion.mappings import StackedExperts

    m = StackedExperts("decoder.layers.*.mlp.experts.local_experts.*.linear_fc1.weight",
                       "model.layers.*.mlp.experts.gate_up_proj", True, interleaved)  # fmt: skip
    name = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"
    assert m.match(name) == ("model.layers.3.mlp.experts.gate_up_proj",)
    assert m.expert_of(name) == 5
    stacked = torch.randn(6, 8, 10)  # [E, in, 2 * ffn]: HF's x @ W layout
    fc1 = m.hf_to_megatron([stacked[5]], None)
    assert fc1.shape == (10, 8)  # Megatron's [out, in]
    if interleaved:  # HF's columns alternate gate, up; Megatron's rows are [gate; up]
        torch.testing.assert_close(fc1[:5], stacked[5][:, 0::2].t(), atol=0, rtol=0)
        torch.testing.assert_close(fc1[5:], stacked[5][:, 1::2].t(), atol=0, rtol=0)
    (back,) = m.megatron_to_hf(fc1, None)
    assert torch.equal(back, stacked[5])


def test_hf_moved_rebases_only_the_prefix():
    from megabridge.conversion.mappings import hf_moved

    moved = hf_moved(blocks.embeddings_and_head(), "model.", "model.language_model.")
    assert [m.hf for m in moved] == [("model.language_model.embed_tokens.weight",),
                                     ("lm_head.weight",)]  # fmt: skip
    assert moved[0].match("embedding.word_embeddings.weight") == moved[0].hf


def test_stacked_experts_either_way_reads_both_orientations():
    """Released Qwen3-VL-MoE [in, out] and transformers 5's [out, in] give one Megatron
    tensor; the export is the released layout; a square slice counts as [out, in]."""
    from types import SimpleNamespace

    fc1, fc2 = blocks.stacked_gated_experts(either_way=True)
    cfg = SimpleNamespace(moe_ffn_hidden_size=3, hidden_size=4)
    weight = torch.randn(6, 4)  # Megatron's linear_fc1 [2 * ffn, hidden]
    assert torch.equal(fc1.hf_to_megatron([weight.t()], cfg), weight)
    assert torch.equal(fc1.hf_to_megatron([weight], cfg), weight)
    assert torch.equal(fc1.megatron_to_hf(weight, cfg)[0], weight.t())
    square = SimpleNamespace(moe_ffn_hidden_size=4, hidden_size=4)
    down = torch.randn(4, 4)
    assert torch.equal(fc2.hf_to_megatron([down], square), down)
