"""OLMo 2: exact round trip, logits vs transformers at TP=1, logits and gradients at TP=2 (from a
TP=1 Megatron checkpoint), verify rejects perturbed weights."""

import pytest
import torch

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_olmo2_config

VARIANTS = {
    "olmo2_gqa": dict(),  # OLMo 2 32B: grouped query heads
    "olmo2_mha": dict(num_key_value_heads=4),  # OLMo 2 7B / 13B: k_norm as wide as q_norm
}


@pytest.fixture(scope="module")
def olmo2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo2")
    return {name: save_tiny(tiny_olmo2_config(**kw), root / name) for name, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(olmo2_dirs, variant, tmp_path):
    checks.round_trip_in_process(olmo2_dirs[variant], tmp_path / "back")
    checks.logits_in_process(olmo2_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_olmo2_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_rejects_perturbed_weights(olmo2_dirs, tmp_path):
    checks.verify_perturbed_rejected_in_process(olmo2_dirs["olmo2_gqa"], tmp_path)


@pytest.mark.unit
def test_config_round_trip_and_torch_spec_only():
    checks.config_round_trip(tiny_olmo2_config())
    from megabridge.errors import ConfigError
    from megabridge.models.olmo2.bridge import Olmo2Bridge
    from megabridge.models.specs import resolve_impl

    cfg = Olmo2Bridge.model_config(tiny_olmo2_config())
    assert resolve_impl(cfg) == "torch"  # auto, with or without Transformer Engine
    cfg.transformer_impl = "local"
    with pytest.raises(ConfigError, match="cannot build norm_placement=post, qk_norm_across"):
        resolve_impl(cfg)


@pytest.mark.integration
@pytest.mark.usefixtures("single_process_megatron")
def test_tp2_logits_and_gradients_from_tp1_checkpoint(olmo2_dirs, tmp_path):
    """The across-heads q/k norm is split over TP with a sum over ranks, forward and backward;
    its weight is resharded from a TP=1 checkpoint."""
    hf = olmo2_dirs["olmo2_gqa"]
    ckpt = checks.to_megatron_checkpoint(hf, tmp_path / "mg")
    checks.parallel_grads(hf, tp=2, extra=["--megatron-path", str(ckpt)])
