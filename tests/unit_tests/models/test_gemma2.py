"""Gemma 2: exact round trip, logits and gradients vs transformers at TP=1, logits at TP=2,
perturbed weights rejected. Sequences (32) are longer than the window (8), and attention is
computed in chunks of 5 queries, so windows straddle chunk boundaries."""

import pytest
import torch

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_gemma2_config

VARIANTS = {
    "gemma2": dict(),  # tied, both soft-caps, sliding window then global
    "gemma2_untied_uncapped": dict(
        tie_word_embeddings=False, attn_logit_softcapping=None, final_logit_softcapping=None
    ),
}


@pytest.fixture(scope="module")
def gemma2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma2")
    return {name: save_tiny(tiny_gemma2_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.fixture
def small_attention_chunks(monkeypatch):
    from megabridge.models import torch_layers

    monkeypatch.setattr(torch_layers, "ATTENTION_CHUNK", 5)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron", "small_attention_chunks")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(gemma2_dirs, variant, tmp_path):
    checks.round_trip_in_process(gemma2_dirs[variant], tmp_path / "back")
    checks.logits_in_process(gemma2_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron", "small_attention_chunks")
def test_gradients_match_transformers(gemma2_dirs):
    checks.gradients_in_process(gemma2_dirs["gemma2"])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_gemma2_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(gemma2_dirs, tmp_path):
    # Scaling a weight whose output reaches a norm linearly (v/o/up/down; Gemma 3: q/k too)
    # changes nothing; gate_proj goes through GELU first.
    checks.perturbed_rejected_in_process(
        gemma2_dirs["gemma2"], tmp_path / "bad", tensor="layers.0.mlp.gate_proj"
    )


@pytest.mark.integration
def test_tp2_logits(gemma2_dirs):
    checks.parallel_logits(gemma2_dirs["gemma2"], ["--tp", "2"])


@pytest.mark.unit
@pytest.mark.parametrize(
    "override, message",
    [
        (dict(attention_bias=True), "attention_bias=True is not supported yet"),
        (dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported yet"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ],
)
def test_unsupported_configs_are_named(override, message):
    from megabridge.errors import UserError
    from megabridge.models.gemma2.bridge import Gemma2Bridge

    with pytest.raises(UserError, match=message):
        Gemma2Bridge.model_config(tiny_gemma2_config(**override))


@pytest.mark.unit
def test_only_the_torch_spec_builds_gemma2():
    from megabridge.errors import ConfigError
    from megabridge.models import specs
    from megabridge.models.gemma2.bridge import Gemma2Bridge

    cfg = Gemma2Bridge.model_config(tiny_gemma2_config())
    assert specs.resolve_impl(cfg) == "torch"  # auto, with or without Transformer Engine
    cfg.transformer_impl = "local"
    with pytest.raises(ConfigError, match="local cannot build norm_placement=pre_post"):
        specs.resolve_impl(cfg)
