"""Llama: exact round trip, logits vs transformers at TP=1/TP=2/PP=2, verify rejects perturbed weights."""

import pytest
import torch

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_llama_config

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
VARIANTS = {
    "llama2": dict(),
    "llama32_tied_rope_scaled": dict(
        tie_word_embeddings=True, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}
    ),
}


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {name: save_tiny(tiny_llama_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(llama_dirs, variant, tmp_path):
    checks.round_trip_in_process(llama_dirs[variant], tmp_path / "back")
    checks.logits_in_process(llama_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_llama_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.integration
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_parallel_logits(llama_dirs, layout):
    checks.parallel_logits(llama_dirs["llama32_tied_rope_scaled"], layout)


@pytest.mark.integration
def test_verify_rejects_perturbed_weights(llama_dirs, tmp_path):
    bad = checks.perturbed_copy(llama_dirs["llama2"], tmp_path / "bad")
    from tests.helpers import megabridge

    conv = megabridge(
        [
            "convert",
            "hf-to-megatron",
            "--hf-path",
            str(bad),
            "--megatron-path",
            str(tmp_path / "mg"),
        ]
    )
    assert conv.returncode == 0, conv.stderr
    rc, data = checks.verify_cli(
        llama_dirs["llama2"], extra=["--megatron-path", str(tmp_path / "mg")]
    )
    assert rc == 1 and not data["ok"] and data["max_abs_diff"] > 1e-3, data
