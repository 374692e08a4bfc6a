"""What a family refuses, or needs, beyond the conformance suite, as data.

Configs a bridge does not support yet get one clear error naming the field; families
whose layers only the torch spec builds say so; a sliding window changes logits; a
layout of four processes.
"""

from __future__ import annotations

import pytest
import torch

from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.registry import bridge_for_family
from megabridge.conversion.tiny import tiny_config
from megabridge.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens
from megabridge.errors import ConfigError, UserError
from megabridge.models.provider import build_model
from megabridge.models.specs import resolve_impl
from tests import conversion_checks as checks
from tests.hf_models import save_tiny

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}  # fmt: skip

# (family, config overrides, the error's words): refused by the bridge's model_config.
REFUSED = [
    ("deepseek_v3", dict(topk_group=2, n_group=2), "num_experts_per_tok = 2 x topk_group"),
    ("deepseek_v3", dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
    ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob=False"),
    ("deepseek_v3", dict(quantization_config={"quant_method": "fp8"}), "FP8"),
    ("gemma2", dict(attention_bias=True), "attention_bias=True is not supported yet"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported yet"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
     "use_sliding_window=True is not supported yet"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True is not supported yet"),
    ("gpt_oss", dict(attention_bias=False), "attention_bias=False is not supported yet"),
]  # fmt: skip

# (family, config overrides, the error's words): converted, but refused when built.
REFUSED_AT_BUILD = [
    # Phi-3.5-mini and the 128k models use longrope.
    ("phi3", dict(rope_parameters=LONGROPE), "rope_type 'longrope' is not supported yet"),
]

# (family, the error's words for transformer_impl="local"): layers only the torch spec has.
TORCH_SPEC_ONLY = [
    ("gemma2", "local cannot build norm_placement=pre_post"),
    ("olmo2", "cannot build norm_placement=post, qk_norm_across"),
    ("gpt_oss", "local cannot build sliding_window, attention_sinks"),
]

# (family, variant) with a sliding window shorter than the verify sequences.
WINDOWED = [("mistral", "window"), ("phi3", "base"), ("gpt_oss", "base")]

# (family, variant, layout) at four processes, beyond the suite's two-process layouts.
FOUR_PROCESSES = [
    # The second pipeline stage must still know which of its layers are global.
    ("gemma3", "base", ["--tp", "2", "--pp", "2"]),
]


def _ids(cases):
    return [f"{c[0]}-{i}" for i, c in enumerate(cases)]


@pytest.mark.unit
@pytest.mark.parametrize("family, overrides, message", REFUSED, ids=_ids(REFUSED))
def test_unsupported_configs_are_refused(family, overrides, message):
    bridge = bridge_for_family(family)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        bridge.model_config(tiny_config(family, **overrides))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family, overrides, message", REFUSED_AT_BUILD, ids=_ids(REFUSED_AT_BUILD))
def test_unsupported_configs_are_refused_at_build(family, overrides, message):
    cfg = bridge_for_family(family).model_config(tiny_config(family, **overrides))
    with pytest.raises(ConfigError, match=message):
        build_model(cfg)


@pytest.mark.unit
@pytest.mark.parametrize("family, message", TORCH_SPEC_ONLY, ids=[c[0] for c in TORCH_SPEC_ONLY])
def test_only_the_torch_spec_builds(family, message):
    cfg = bridge_for_family(family).model_config(tiny_config(family))
    assert resolve_impl(cfg) == "torch"  # auto, with or without Transformer Engine
    cfg.transformer_impl = "local"
    with pytest.raises(ConfigError, match=message):
        resolve_impl(cfg)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family, variant", WINDOWED, ids=["-".join(c) for c in WINDOWED])
def test_sliding_window_changes_logits(family, variant, tmp_path):
    """The conformance logits check of a windowed variant means something: without the
    window, the logits differ."""
    hf_dir = save_tiny(tiny_config(family, variant), tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    assert provider.sliding_window is not None
    provider.sliding_window = None
    tokens = sample_tokens(provider.vocab_size, 2, 32, seed=0)
    logits = megatron_logits(bridge.to_megatron_model(provider), tokens)
    reference = hf_logits(hf_dir, tokens, torch.float32, "cpu")
    result = compare(reference, logits, provider.vocab_size, torch.float32, 1e-4, None)
    assert result.max_abs_diff > 1e-2, result


@pytest.mark.integration
@pytest.mark.parametrize(
    "family, variant, layout", FOUR_PROCESSES, ids=[f"{c[0]}-{c[1]}" for c in FOUR_PROCESSES]
)
def test_logits_at_four_processes(family, variant, layout, tmp_path):
    hf_dir = save_tiny(tiny_config(family, variant), tmp_path / "hf")
    rc, data = checks.verify_cli(hf_dir, nproc=4, extra=[*layout, "--atol", str(checks.ATOL_FP32)])
    assert rc == 0 and data["ok"], data
    assert data["max_abs_diff"] <= checks.ATOL_FP32 and data["top1_agreement"] == 1.0, data
