"""Qwen2-MoE (a dense and an MoE layer, gated shared expert): exact round trips at TP=1 and EP=2,
logits vs transformers at TP=1 / TP=2 / EP=2, verify rejects perturbed weights."""

import pytest

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_qwen2_moe_config

VARIANTS = {
    "top_k_softmax": dict(),  # norm_topk_prob=False: softmax over all experts, then top-k
    "renormalised": dict(norm_topk_prob=True, decoder_sparse_step=1),  # every layer MoE
}


@pytest.fixture(scope="module")
def qwen2_moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_moe")
    return {n: save_tiny(tiny_qwen2_moe_config(**kw), root / n) for n, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(qwen2_moe_dirs, variant, tmp_path):
    checks.round_trip_in_process(qwen2_moe_dirs[variant], tmp_path / "back")
    checks.logits_in_process(qwen2_moe_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_perturbed_weights_are_rejected(qwen2_moe_dirs, tmp_path):
    checks.perturbed_rejected_in_process(qwen2_moe_dirs["top_k_softmax"], tmp_path / "bad")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_model_from_scratch_exports_to_transformers(tmp_path):
    checks.export_from_scratch_in_process("qwen2_moe_tiny_pretrain_config", tmp_path / "hf")


@pytest.mark.integration
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"]], ids=["tp2", "ep2"])
def test_parallel_logits(qwen2_moe_dirs, layout):
    checks.parallel_logits(qwen2_moe_dirs["top_k_softmax"], layout)


@pytest.mark.integration
def test_ep2_convert_and_export_bit_exact(qwen2_moe_dirs, tmp_path):
    checks.parallel_round_trip(qwen2_moe_dirs["top_k_softmax"], tmp_path, ["--ep", "2"])
