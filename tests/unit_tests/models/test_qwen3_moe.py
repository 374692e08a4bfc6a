"""Qwen3-MoE: exact round trip, logits vs transformers at TP=1 and EP=2, verify rejects perturbed weights."""

import pytest

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_qwen3_moe_config

VARIANTS = {"all_moe": dict(), "dense_layer_1": dict(mlp_only_layers=[1])}


@pytest.fixture(scope="module")
def qwen3_moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_moe")
    return {n: save_tiny(tiny_qwen3_moe_config(**kw), root / n) for n, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(qwen3_moe_dirs, variant, tmp_path):
    checks.round_trip_in_process(qwen3_moe_dirs[variant], tmp_path / "back")
    checks.logits_in_process(qwen3_moe_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_perturbed_weights_are_rejected(qwen3_moe_dirs, tmp_path):
    checks.perturbed_rejected_in_process(qwen3_moe_dirs["all_moe"], tmp_path / "bad")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_model_from_scratch_exports_to_transformers(tmp_path):
    checks.export_from_scratch_in_process("qwen3_moe_tiny_pretrain_config", tmp_path / "hf")


@pytest.mark.integration
def test_ep2_logits(qwen3_moe_dirs):
    checks.parallel_logits(qwen3_moe_dirs["dense_layer_1"], ["--ep", "2"])
