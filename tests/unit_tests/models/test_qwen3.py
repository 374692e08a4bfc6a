"""Qwen3: exact round trip, logits vs transformers at TP=1/TP=2, verify rejects perturbed weights."""

import pytest
import torch

from megabridge.errors import UserError
from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_qwen3_config

# tiny_qwen3_config has head_dim 32 with 4 heads on hidden 64 (heads * head_dim != hidden).
VARIANTS = {
    "qwen3": dict(),
    "qwen3_tied": dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
}


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {name: save_tiny(tiny_qwen3_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(qwen3_dirs, variant, tmp_path):
    checks.round_trip_in_process(qwen3_dirs[variant], tmp_path / "back")
    checks.logits_in_process(qwen3_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_qwen3_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(qwen3_dirs, tmp_path):
    checks.verify_perturbed_rejected_in_process(qwen3_dirs["qwen3"], tmp_path)


@pytest.mark.unit
def test_config_round_trip_and_attention_bias_rejected():
    checks.config_round_trip(tiny_qwen3_config())
    from megabridge.models.qwen3.bridge import Qwen3Bridge

    with pytest.raises(UserError, match="attention_bias=True is not supported yet"):
        Qwen3Bridge.model_config(tiny_qwen3_config(attention_bias=True))


@pytest.mark.integration
def test_tp2_logits(qwen3_dirs):
    checks.parallel_logits(qwen3_dirs["qwen3"], ["--tp", "2"])
