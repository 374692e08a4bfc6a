"""What a family refuses, or needs, beyond the conformance suite, as data.

Configs a bridge does not support yet get one clear error naming the field; families
whose layers only the torch spec builds say so; a sliding window changes logits; a
layout of four processes.
"""

from __future__ import annotations

import pytest
import torch

from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.registry import (
    NOT_SUPPORTED_YET,
    bridge_for,
    bridge_for_family,
    bridges,
)
from megabridge.conversion.tiny import tiny_config
from megabridge.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens
from megabridge.errors import ConfigError, UserError
from megabridge.models.provider import build_model
from megabridge.models.specs import resolve_impl
from tests import conversion_checks as checks
from tests.hf_models import randomize, save_tiny

DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}

# (family, config overrides, the error's words): refused by the bridge's model_config.
REFUSED = [
    ("deepseek_v3", dict(topk_group=2, n_group=2), "num_experts_per_tok = 2 x topk_group"),
    ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob=False"),
    ("deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob=True is not supported yet"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method='noaux_tc' is not supported"),
    ("gemma2", dict(attention_bias=True), "attention_bias=True is not supported yet"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation='gelu' is not supported yet"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("qwen2", dict(layer_types=["chunked_attention", "full_attention"]),
     r"layer_types \['chunked_attention'\] are not supported yet"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True is not supported yet"),
    ("glm4_moe", dict(norm_topk_prob=False), "norm_topk_prob=False is not supported yet"),
    ("glm4_moe", dict(n_group=2, topk_group=2), "num_experts_per_tok = 2 x topk_group"),
    ("gemma", dict(hidden_act="relu"), "hidden_act='relu' is not supported yet"),
    ("granite", dict(mlp_bias=True), "mlp_bias=True is not supported yet"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0 is not supported yet"),
    ("seed_oss", dict(attention_out_bias=True), "attention_out_bias=True is not supported yet"),
    ("smollm3", dict(layer_types=["chunked_attention"] * 4), "chunked_attention"),
    ("exaone4", dict(layer_types=["chunked_attention"] * 4), "chunked_attention"),
    # The long-context OLMo 3 releases scale the global layers' RoPE with YaRN.
    ("olmo3", dict(rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5,
                           "original_max_position_embeddings": 64},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}),
     "rope_type 'yarn' on its full_attention layers is not supported yet"),
    ("gpt_oss", dict(attention_bias=False), "attention_bias=False is not supported yet"),
    # Megatron-Core applies router weights to the experts' input with top-1 only.
    ("llama4", dict(num_experts_per_tok=2), "num_experts_per_tok=2 is not supported yet"),
    ("llama4", dict(attention_bias=True), "attention_bias=True is not supported yet"),
]  # fmt: skip

# (family, config overrides, the error's words): converted, but refused when built.
REFUSED_AT_BUILD = [
    ("llama", dict(rope_parameters=DYNAMIC), "rope_type 'dynamic' is not supported yet"),
    # YaRN's frequencies are computed for any family, its attention factor only by GPT-OSS's.
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                    "original_max_position_embeddings": 64}),
     "the llama bridge does not set: not supported for this family yet"),
]  # fmt: skip

# (family, the error's words for transformer_impl="local"): layers only the torch spec has.
TORCH_SPEC_ONLY = [
    ("gemma2", "local cannot build norm_placement=pre_post"),
    ("olmo2", "cannot build norm_placement=post, qk_norm_across"),
    ("granite", "cannot build residual_multiplier"),
    ("exaone4", "cannot build norm_placement=post, sliding_window"),
    ("gpt_oss", "local cannot build rotary_attention_scaling, sliding_window, attention_sinks"),
    ("llama4", "local cannot build attention_chunk_size, qk_l2_norm_layers, attn_temperature_"),
]

# (family, variant) with a sliding window shorter than the verify sequences.
WINDOWED = [("mistral", "window"), ("phi3", "base"), ("smollm3", "nope_02_windowed"),
            ("exaone4", "base"), ("qwen2", "window"), ("qwen3", "window"),
            ("gpt_oss", "base")]  # fmt: skip

# (family, variant) with layers without RoPE (NoPE).
NOPE = [("smollm3", "base"), ("exaone4", "base"), ("llama4", "plain_nope")]

# (family, variant, ModelConfig field, a value without the variant's option): the
# conformance logits check of the variant means something, as the logits differ without it.
OPTION_MATTERS = [
    # Megatron-Core's own group ranking (top-2 sum) picks other experts than V2's (best score).
    ("deepseek_v2", "group_limited", "moe_router_group_score", "top_sum"),
    # YaRN's attention factor (transformers' scale on cos and sin), not its frequencies.
    ("gpt_oss", "base", "rotary_attention_scaling", 1.0),
    # Llama 4: chunks of 8 tokens on the RoPE layers, their weightless QK norm, the NoPE
    # layer's query temperature, the router weight on the expert's input (not its output).
    ("llama4", "base", "attention_chunk_size", None),
    ("llama4", "base", "qk_l2_norm_layers", None),
    ("llama4", "base", "attn_temperature_scale", None),
    ("llama4", "scout", "moe_apply_probs_on_input", False),
]

# (family, variant, layout) at four processes, beyond the suite's two-process layouts.
FOUR_PROCESSES = [
    # The second pipeline stage must still know which of its layers are global.
    ("gemma3", "base", ["--tp", "2", "--pp", "2"]),
    # Experts with biases stay whole on each TP rank (expert TP 1) while EP splits them;
    # nightly (2.5 min on 2 cores; TP=2 and EP=2 alone run in CI's conformance launch).
    pytest.param("gpt_oss", "base", ["--tp", "2", "--ep", "2"], marks=pytest.mark.skipduringci),
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


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family, variant", NOPE, ids=["-".join(c) for c in NOPE])
def test_nope_layers_change_logits(family, variant, tmp_path):
    """The conformance logits check of a variant with NoPE layers means something: with
    RoPE on every layer, the logits differ."""
    hf_dir = save_tiny(tiny_config(family, variant), tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    assert provider.no_rope_layers
    provider.no_rope_layers = None
    tokens = sample_tokens(provider.vocab_size, 2, 32, seed=0)
    logits = megatron_logits(bridge.to_megatron_model(provider), tokens)
    reference = hf_logits(hf_dir, tokens, torch.float32, "cpu")
    result = compare(reference, logits, provider.vocab_size, torch.float32, 1e-4, None)
    assert result.max_abs_diff > 1e-3, result  # 10x the conformance tolerance at least


@pytest.mark.unit
@pytest.mark.parametrize("architecture", sorted(NOT_SUPPORTED_YET))
def test_known_unsupported_architectures_say_why(architecture):
    """Refused in one line with the reason, not with the list of supported ones."""
    assert architecture not in bridges()
    with pytest.raises(UserError, match=f"{architecture}' is not supported yet: .+") as e:
        bridge_for(architecture)
    assert "\n" not in str(e.value)


@pytest.mark.integration
@pytest.mark.parametrize(
    "family, variant, layout",
    FOUR_PROCESSES,
    ids=["-".join(getattr(c, "values", c)[:2]) for c in FOUR_PROCESSES],  # a tuple or a param
)
def test_logits_at_four_processes(family, variant, layout, tmp_path):
    hf_dir = save_tiny(tiny_config(family, variant), tmp_path / "hf")
    rc, data = checks.verify_cli(hf_dir, nproc=4, extra=[*layout, "--atol", str(checks.ATOL_FP32)])
    assert rc == 0 and data["ok"], data
    assert data["max_abs_diff"] <= checks.ATOL_FP32 and data["top1_agreement"] == 1.0, data


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "family, variant, field, value", OPTION_MATTERS, ids=["-".join(c[:2]) for c in OPTION_MATTERS]
)
def test_variant_option_changes_logits(family, variant, field, value, tmp_path):
    hf_dir = save_tiny(tiny_config(family, variant), tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    assert getattr(provider, field) != value
    setattr(provider, field, value)
    tokens = sample_tokens(provider.vocab_size, 2, 32, seed=0)
    logits = megatron_logits(bridge.to_megatron_model(provider), tokens)
    reference = hf_logits(hf_dir, tokens, torch.float32, "cpu")
    result = compare(reference, logits, provider.vocab_size, torch.float32, 1e-4, None)
    assert result.max_abs_diff > 1e-2, result


@pytest.mark.unit
def test_kimi_k2_config_reads_as_deepseek_v3(tmp_path):
    """Kimi-K2's config.json (model_type kimi_k2, remote code that transformers does not
    run) converts as DeepSeek-V3 and exports with its own model_type."""
    import json

    hf_dir = save_tiny(tiny_config("deepseek_v3", "kimi_k2_yarn"), tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    expected = AutoBridge.from_hf_pretrained(hf_dir).model_config
    auto_map = {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}
    kimi = {**config, "model_type": "kimi_k2", "auto_map": auto_map}
    (hf_dir / "config.json").write_text(json.dumps(kimi))
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    assert bridge.family.family == "deepseek_v3" and bridge.model_config == expected
    assert bridge.hf_config_for_export()["model_type"] == "kimi_k2"


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_longrope_short_sequences_match_transformers(tmp_path):
    """Sequences up to original_max_position_embeddings (16) take longrope's short factors
    (the conformance suite's 32-token ones take the long factors): logits as transformers'."""
    hf_dir = save_tiny(tiny_config("phi3", "longrope"), tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    model = bridge.to_megatron_model()
    for length in (16, 17):  # the last short length, the first long one
        tokens = sample_tokens(bridge.model_config.vocab_size, 2, length, seed=length)
        reference = hf_logits(hf_dir, tokens, torch.float32, "cpu")
        result = compare(reference, megatron_logits(model, tokens), 256, torch.float32, 1e-4, None)
        assert result.max_abs_diff <= checks.ATOL_FP32, (length, result)


_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=28, patch_size=14)  # fmt: skip
# family -> (transformers' multimodal config and model, the text-only model it exports as,
# config arguments, the submodule to run on text: transformers 5.24's text-only forward of
# Llama4ForConditionalGeneration fails, reading image_outputs of a text-only output).
MULTIMODAL = {
    # Gemma 3 4B's layout: text + SigLIP vision.
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", "Gemma3ForCausalLM",
               dict(vision_config=_VISION, mm_tokens_per_image=4), None),
    # Llama 4 Scout's and Maverick's layout: text + vision tower + projector.
    "llama4": ("Llama4Config", "Llama4ForConditionalGeneration", "Llama4ForCausalLM",
               dict(vision_config=dict(_VISION, vision_output_dim=16, projector_input_dim=16,
                                       projector_output_dim=16)), "language_model"),
}  # fmt: skip


def _tiny_multimodal(family: str, path):
    import transformers

    config_class, model_class, _, kwargs, _ = MULTIMODAL[family]
    config = getattr(transformers, config_class)(
        text_config=tiny_config(family).to_dict(), **kwargs
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    randomize(model)
    model.save_pretrained(str(path))
    return model.eval()


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", sorted(MULTIMODAL))
def test_multimodal_reads_as_its_language_model(family, tmp_path):
    import transformers
    from safetensors.torch import load_file

    _, _, text_class, _, text_module = MULTIMODAL[family]
    hf_model = _tiny_multimodal(family, tmp_path / "mm")
    # text_only: Gemma 3's checkpoint is otherwise a vision-language model (gemma3_vl)
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "mm", text_only=True)
    assert bridge.model_config == bridge_for_family(family).model_config(tiny_config(family))
    model = bridge.to_megatron_model()
    tokens = sample_tokens(256, 2, 32, seed=0)
    with torch.no_grad():
        runs = getattr(hf_model, text_module) if text_module else hf_model
        reference = runs(input_ids=tokens).logits.float()
    result = compare(reference, megatron_logits(model, tokens), 256, torch.float32, 1e-4, None)
    assert result.max_abs_diff <= checks.ATOL_FP32, result

    # The export is a text-only model holding the language model's tensors as they were.
    out = bridge.save_hf_pretrained(model, tmp_path / "text")
    exported = getattr(transformers, text_class).from_pretrained(str(out)).eval()
    assert exported.config.architectures == [text_class]
    source = load_file(str(tmp_path / "mm" / "model.safetensors"))
    tensors = {n: t for f in out.glob("*.safetensors") for n, t in load_file(str(f)).items()}
    assert set(tensors) == {n.removeprefix("language_model.") for n in source
                            if n.startswith("language_model.")}  # fmt: skip
    for name, tensor in tensors.items():
        assert torch.equal(tensor, source[f"language_model.{name}"]), name
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=tokens).logits, reference, atol=1e-5)
