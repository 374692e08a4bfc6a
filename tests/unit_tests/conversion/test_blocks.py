"""The mapping blocks compose into tables where every tensor has exactly one mapping."""

from types import SimpleNamespace

import pytest

from megabridge.conversion import blocks
from megabridge.conversion.family import FamilyBridge
from megabridge.conversion.registry import bridges
from megabridge.errors import UserError

pytestmark = pytest.mark.unit


def _example(pattern: str) -> str:
    """A concrete name for a pattern: layer 3, expert 5."""
    return pattern.replace("*", "3", 1).replace("*", "5")


@pytest.mark.parametrize("architecture", sorted(bridges()))
def test_no_two_mappings_claim_one_tensor(architecture):
    bridge = bridges()[architecture]
    megatron = [_example(m.megatron) for m in bridge.MAPPINGS]
    hf = [_example(name) for m in bridge.MAPPINGS for name in m.hf]
    assert len(set(megatron)) == len(megatron), sorted(megatron)
    assert len(set(hf)) == len(hf), sorted(hf)
    for mapping in bridge.MAPPINGS:  # and resolve() finds each one's own
        assert bridge.resolve(_example(mapping.megatron))[0] is mapping


def test_routed_experts_take_the_family_projection_names():
    (down, gate_up) = blocks.routed_experts(
        "model.layers.*.block_sparse_moe.experts", blocks.W1_W3_W2
    )
    assert down.megatron == "decoder.layers.*.mlp.experts.local_experts.*.linear_fc2.weight"
    assert down.hf == ("model.layers.*.block_sparse_moe.experts.*.w2.weight",)
    assert gate_up.hf == (
        "model.layers.*.block_sparse_moe.experts.*.w1.weight",
        "model.layers.*.block_sparse_moe.experts.*.w3.weight",
    )
    # The layer index fills the first *, the expert index the second, on both sides.
    assert gate_up.match("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight") == (
        "model.layers.3.block_sparse_moe.experts.5.w1.weight",
        "model.layers.3.block_sparse_moe.experts.5.w3.weight",
    )


class _Bridge(FamilyBridge):
    family = "test"
    architectures = ("TestForCausalLM",)
    NAME = "Test"
    UNSUPPORTED = {"attention_bias": "why", "use_sliding_window": "why"}


def test_unsupported_flag_is_refused_in_one_line():
    hf_config = SimpleNamespace(attention_bias=False, use_sliding_window=True)
    with pytest.raises(UserError) as e:
        _Bridge.model_config(hf_config)
    assert str(e.value) == "Test with use_sliding_window=True is not supported yet"
