"""Mixtral: exact round trip, logits vs transformers at TP=1 and EP=2, verify rejects perturbed weights."""

import pytest

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_mixtral_config


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny(tiny_mixtral_config(), tmp_path_factory.mktemp("mixtral") / "hf")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_round_trip_bit_exact_and_logits(mixtral_dir, tmp_path):
    checks.round_trip_in_process(mixtral_dir, tmp_path / "back")
    checks.logits_in_process(mixtral_dir)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_perturbed_weights_are_rejected(mixtral_dir, tmp_path):
    checks.perturbed_rejected_in_process(mixtral_dir, tmp_path / "bad")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_model_from_scratch_exports_to_transformers(tmp_path):
    checks.export_from_scratch_in_process("mixtral_tiny_pretrain_config", tmp_path / "hf")


@pytest.mark.integration
def test_ep2_logits(mixtral_dir):
    checks.parallel_logits(mixtral_dir, ["--ep", "2"])
