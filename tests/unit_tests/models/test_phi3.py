"""Phi-3: exact round trip (fused qkv / gate_up), logits vs transformers at TP=1/TP=2,
verify rejects perturbed weights."""

import pytest
import torch

from megabridge.errors import ConfigError
from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_phi3_config

VARIANTS = {
    # Phi-3-mini-4k: a sliding window (2047 there) shorter than the verify sequences.
    "phi3_mini_4k_window": dict(sliding_window=8),
    "partial_rotary": dict(partial_rotary_factor=0.5),
}


@pytest.fixture(scope="module")
def phi3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    return {name: save_tiny(tiny_phi3_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(phi3_dirs, variant, tmp_path):
    checks.round_trip_in_process(phi3_dirs[variant], tmp_path / "back")
    checks.logits_in_process(phi3_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_phi3_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(phi3_dirs, tmp_path):
    checks.verify_perturbed_rejected_in_process(phi3_dirs["partial_rotary"], tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trip(variant):
    checks.config_round_trip(tiny_phi3_config(**VARIANTS[variant]))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_longrope_is_rejected_clearly():
    """Phi-3.5-mini and the 128k models use longrope, which is not supported yet."""
    from megabridge.models.phi3.bridge import Phi3Bridge
    from megabridge.models.provider import build_model

    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}  # fmt: skip
    cfg = Phi3Bridge.model_config(tiny_phi3_config(rope_parameters=longrope))
    with pytest.raises(ConfigError, match="rope_type 'longrope' is not supported yet"):
        build_model(cfg)


@pytest.mark.integration
def test_tp2_logits(phi3_dirs):
    checks.parallel_logits(phi3_dirs["phi3_mini_4k_window"], ["--tp", "2"])
