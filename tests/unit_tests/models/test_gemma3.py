"""Gemma 3 (text): exact round trip, logits vs transformers at TP=1 and at TP=2 x PP=2 (the
second stage must still know which of its layers are global), perturbed weights rejected.
Sequences (32) are longer than the window (8); attention runs in chunks of 5 queries."""

import pytest
import torch

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_gemma3_config

VARIANTS = {
    "gemma3": dict(),  # tied; local theta 1e3, global theta 1e5 with linear scaling
    "gemma3_untied_capped": dict(
        tie_word_embeddings=False,
        final_logit_softcapping=3.0,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
}


@pytest.fixture(scope="module")
def gemma3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    return {name: save_tiny(tiny_gemma3_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.fixture
def small_attention_chunks(monkeypatch):
    from megabridge.models import torch_layers

    monkeypatch.setattr(torch_layers, "ATTENTION_CHUNK", 5)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron", "small_attention_chunks")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(gemma3_dirs, variant, tmp_path):
    checks.round_trip_in_process(gemma3_dirs[variant], tmp_path / "back")
    checks.logits_in_process(gemma3_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron", "small_attention_chunks")
def test_gradients_match_transformers(gemma3_dirs):
    checks.gradients_in_process(gemma3_dirs["gemma3"])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_gemma3_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(gemma3_dirs, tmp_path):
    # Scaling a weight whose output reaches a norm linearly (v/o/up/down; Gemma 3: q/k too)
    # changes nothing; gate_proj goes through GELU first.
    checks.perturbed_rejected_in_process(
        gemma3_dirs["gemma3"], tmp_path / "bad", tensor="layers.0.mlp.gate_proj"
    )


@pytest.mark.integration
def test_tp2_pp2_logits(gemma3_dirs):
    checks.parallel_logits(gemma3_dirs["gemma3"], ["--tp", "2", "--pp", "2"], nproc=4)
