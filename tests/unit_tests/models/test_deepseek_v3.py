"""DeepSeek-V3 (MLA, sigmoid group-limited routing with expert bias, shared expert, a dense first
layer): exact round trips (fp32, bf16), logits vs transformers at TP=1 / TP=2 / EP=2, verify
rejects perturbed weights, unsupported configs are refused with one clear error."""

import pytest
import torch

from tests import conversion_checks as checks
from tests.hf_models import save_tiny, tiny_deepseek_v3_config

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 32}  # fmt: skip
VARIANTS = {"rope": dict(), "yarn": dict(rope_parameters=YARN)}


@pytest.fixture(scope="module")
def deepseek_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_v3")
    return {n: save_tiny(tiny_deepseek_v3_config(**kw), root / n) for n, kw in VARIANTS.items()}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_bit_exact_and_logits(deepseek_dirs, variant, tmp_path):
    checks.round_trip_in_process(deepseek_dirs[variant], tmp_path / "back")
    checks.logits_in_process(deepseek_dirs[variant])


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_bf16_round_trip_bit_exact(tmp_path):
    hf = save_tiny(tiny_deepseek_v3_config(), tmp_path / "bf16", dtype=torch.bfloat16)
    checks.round_trip_in_process(hf, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_perturbed_weights_are_rejected(deepseek_dirs, tmp_path):
    checks.perturbed_rejected_in_process(deepseek_dirs["rope"], tmp_path / "bad")


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(topk_group=2, n_group=2), "num_experts_per_tok = 2 x topk_group"),
        (dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
        (dict(norm_topk_prob=False), "norm_topk_prob=False"),
        (dict(quantization_config={"quant_method": "fp8"}), "FP8"),
    ],
)
def test_unsupported_configs_are_refused(overrides, message):
    from megabridge.errors import UserError
    from megabridge.models.deepseek_v3.bridge import DeepseekV3Bridge

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        DeepseekV3Bridge.model_config(tiny_deepseek_v3_config(**overrides))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_model_from_scratch_exports_to_transformers(tmp_path):
    checks.export_from_scratch_in_process("deepseek_v3_tiny_pretrain_config", tmp_path / "hf")


@pytest.mark.integration
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--ep", "2"]], ids=["tp2", "ep2"])
def test_parallel_logits(deepseek_dirs, layout):
    checks.parallel_logits(deepseek_dirs["yarn"], layout)
