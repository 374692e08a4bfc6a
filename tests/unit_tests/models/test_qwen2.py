"""Qwen2 / Qwen2.5: exact round trip, logits vs transformers at TP=1/TP=2, verify rejects perturbed weights."""

import pytest
import torch

from megabridge.errors import UserError
from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_qwen2_config

VARIANTS = {
    "qwen25": dict(),
    # Qwen2.5 0.5B-3B tie the output layer to the embedding.
    "qwen25_tied": dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
}


@pytest.fixture(scope="module")
def qwen2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    return {name: save_tiny(tiny_qwen2_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(qwen2_dirs, variant, tmp_path):
    checks.round_trip_in_process(qwen2_dirs[variant], tmp_path / "back")
    checks.logits_in_process(qwen2_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_qwen2_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(qwen2_dirs, tmp_path):
    checks.verify_perturbed_rejected_in_process(qwen2_dirs["qwen25"], tmp_path)


@pytest.mark.unit
def test_config_round_trip_and_sliding_window_rejected():
    checks.config_round_trip(tiny_qwen2_config(**VARIANTS["qwen25_tied"]))
    from megabridge.models.qwen2.bridge import Qwen2Bridge

    windowed = tiny_qwen2_config(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    with pytest.raises(UserError, match="use_sliding_window=True is not supported yet"):
        Qwen2Bridge.model_config(windowed)


@pytest.mark.integration
def test_tp2_logits(qwen2_dirs):
    checks.parallel_logits(qwen2_dirs["qwen25_tied"], ["--tp", "2"])
