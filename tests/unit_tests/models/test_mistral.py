"""Mistral: exact round trip, logits vs transformers at TP=1/TP=2 (sliding window included),
verify rejects perturbed weights."""

import pytest
import torch

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_mistral_config

VARIANTS = {
    # v0.3 / NeMo: no window; NeMo's head_dim (128) is not hidden / heads (160).
    "mistral_nemo_head_dim": dict(head_dim=32),
    # v0.1: a sliding window (4096 there) shorter than the 32-token verify sequences.
    "mistral_v01_window": dict(sliding_window=8),
}


@pytest.fixture(scope="module")
def mistral_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral")
    return {
        name: save_tiny(tiny_mistral_config(**kw), root / name) for name, kw in VARIANTS.items()
    }


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(mistral_dirs, variant, tmp_path):
    checks.round_trip_in_process(mistral_dirs[variant], tmp_path / "back")
    checks.logits_in_process(mistral_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_window_changes_logits(mistral_dirs):
    """The window variant's logits check means something: without the window they differ."""
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens

    hf_dir = mistral_dirs["mistral_v01_window"]
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    provider.sliding_window = None
    tokens = sample_tokens(provider.vocab_size, 2, 32, seed=0)
    logits = megatron_logits(bridge.to_megatron_model(provider), tokens)
    reference = hf_logits(hf_dir, tokens, torch.float32, "cpu")
    assert compare(reference, logits, 256, torch.float32, 1e-4, None).max_abs_diff > 1e-2


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_mistral_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(mistral_dirs, tmp_path):
    checks.verify_perturbed_rejected_in_process(mistral_dirs["mistral_nemo_head_dim"], tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trip(variant):
    # MistralConfig defaults to a 4096 window: "no window" must survive export.
    checks.config_round_trip(tiny_mistral_config(**VARIANTS[variant]))


@pytest.mark.integration
def test_tp2_logits(mistral_dirs):
    checks.parallel_logits(mistral_dirs["mistral_v01_window"], ["--tp", "2"])
