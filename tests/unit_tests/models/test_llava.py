"""LLaVA (LlavaForConditionalGeneration) against transformers' own classes.

Tiny random models (models/llava/tiny.py: CLIP + Llama, SigLIP + tied Qwen2) with their
own processors, and generated images: config round trip, bit-exact HF -> Megatron -> HF
of every tensor, logits on text and image positions within 1e-4 of transformers', the
Hub's older tensor names read, perturbed tower and projector weights rejected, and the
unsupported configurations refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests.vision_models import save_tiny_llava

ATOL = 1e-4
VARIANTS = ["base", "siglip_qwen2"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return {v: save_tiny_llava(root / v, v) for v in VARIANTS}


@pytest.mark.unit
@pytest.mark.parametrize("variant", [*VARIANTS, "pixtral_mistral"])
def test_config_round_trip(variant):
    checks.config_round_trip(tiny_config("llava", variant))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "variant, dtype, shards, tower_params",
    # CLIP: 3 embedding tensors (with the class token), pre/post norms, 12 per layer
    # (Megatron-Core's: q, k, v fused), projector 4; SigLIP: 3 (a patch bias, no class
    # token), a post-norm, the pooling head's 11.
    [("base", torch.float32, 40_000, 3 + 4 + 24 + 4),
     ("siglip_qwen2", torch.bfloat16, None, 3 + 2 + 24 + 11 + 4)],
    ids=["clip-llama-fp32-sharded", "siglip-qwen2-tied-bf16"],
)  # fmt: skip
def test_round_trip_bit_exact(variant, dtype, shards, tower_params, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge

    source = save_tiny_llava(tmp_path / "hf", variant, dtype=dtype, max_shard_size=shards)
    if shards:
        assert len(set(json.loads((source / checks.INDEX).read_text())["weight_map"].values())) > 1
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    vision = [n for n, _ in model[0].named_parameters() if n.startswith("vision.")]
    assert len(vision) == tower_params, vision
    # the layers' MLP padded to 64 units (SigLIP's 60: zeros), the export unpadded
    fc1 = model[0].vision.vision_tower.encoder.layers[0].mlp.linear_fc1.weight
    ffn = bridge.model_config.vision["intermediate_size"]
    assert fc1.shape[0] == 64 and fc1[ffn:].eq(0).all()
    bridge.save_hf_pretrained(model, tmp_path / "back")
    checks.assert_same_hf_folder(source, tmp_path / "back")
    assert (tmp_path / "back" / "processor_config.json").is_file()  # the processor travels


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_on_images_match_transformers(hf_dirs, images, variant):
    from megabridge.conversion import image_inputs
    from megabridge.conversion.verify import verify

    result = verify(hf_dirs[variant], images=images)
    assert result.ok and result.max_abs_diff <= ATOL and result.top1_agreement == 1.0, result
    # 16 image tokens per image (4 x 4 patches; CLIP's class token dropped), all compared
    vision = {"kind": "llava"}
    samples = image_inputs.image_samples(hf_dirs[variant], images, vision)
    assert [int((s.input_ids == 92).sum()) for s in samples] == [16, 16, 16]
    assert result.tokens == sum(s.input_ids.numel() for s in samples)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_pixtral_tower_round_trip_and_logits(images, tmp_path):
    """Pixtral-12B's layout (LLaVA + a Pixtral tower, models/mistral3/tower.py, no patch
    merging): bit-exact round trip, and logits on images of three sizes within 1e-4 of
    transformers', every patch an image token."""
    from megabridge.conversion import image_inputs
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import verify

    source = save_tiny_llava(tmp_path / "hf", "pixtral_mistral")
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    bridge.save_hf_pretrained(model, tmp_path / "back")
    checks.assert_same_hf_folder(source, tmp_path / "back")
    result = verify(source, images=images)
    assert result.ok and result.max_abs_diff <= ATOL and result.top1_agreement == 1.0, result
    samples = image_inputs.image_samples(source, images, {"kind": "pixtral"})
    sizes = [s.hf_extra["image_sizes"][0].tolist() for s in samples]
    assert len({tuple(s) for s in sizes}) == 3  # each image kept at its own aspect
    tokens = [int((s.input_ids == 92).sum()) for s in samples]
    assert tokens == [(h // 4) * (w // 4) for h, w in sizes], (tokens, sizes)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_hub_tensor_names_are_read(hf_dirs, images, tmp_path):
    """The Hub's llava-hf files: language_model.*, vision_tower.vision_model.*; transformers
    5's in-memory names: model.language_model.*, lm_head.*; both convert and verify."""
    from safetensors.torch import load_file, save_file

    from megabridge.conversion.verify import verify

    source = hf_dirs["base"]
    renamed = {"vision_tower.": "vision_tower.vision_model.", "language_model.model.": "model.language_model.",
               "language_model.lm_head.": "lm_head."}  # fmt: skip
    tensors = load_file(str(source / "model.safetensors"))
    out = tmp_path / "hub"
    out.mkdir()
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    moved = {}
    for name, t in tensors.items():
        old = next((p for p in renamed if name.startswith(p)), None)
        moved[name if old is None else renamed[old] + name.removeprefix(old)] = t
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = verify(out, checks.to_megatron_checkpoint(out, tmp_path / "megatron"), images=images)
    assert result.ok and result.max_abs_diff <= ATOL, result


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "tensor", ["vision_tower.encoder.layers.0.mlp.fc2", "multi_modal_projector.linear_1"]
)
def test_verify_rejects_perturbed_vision_weights(hf_dirs, images, tensor, tmp_path):
    from megabridge.conversion.verify import verify

    bad_hf = checks.perturbed_copy(hf_dirs["base"], tmp_path / "bad_hf", tensor=tensor)
    bad = verify(
        hf_dirs["base"], checks.to_megatron_checkpoint(bad_hf, tmp_path / "bad"), images=images
    )
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_streamed_checkpoint_round_trip_bit_exact(hf_dirs, tmp_path):
    """convert hf-to-megatron then megatron-to-hf, streamed: the checkpoint names its
    language model's family, and the export is the same folder."""
    from megabridge.conversion.auto_bridge import AutoBridge

    megatron = checks.to_megatron_checkpoint(hf_dirs["siglip_qwen2"], tmp_path / "megatron")
    bridge = AutoBridge.from_megatron_checkpoint(megatron)
    assert bridge.family.LANGUAGE_FAMILY.family == "qwen2"
    out = bridge.save_hf_from_checkpoint(tmp_path / "back")
    assert out is not None
    checks.assert_same_hf_folder(hf_dirs["siglip_qwen2"], tmp_path / "back")


@pytest.mark.unit
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(text_config=dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4)),
         "with a 'gpt2' language model is not supported yet; supported: "),
        (dict(vision_config=dict(model_type="siglip2_vision_model")),
         "with a 'siglip2_vision_model' vision tower"),
        (dict(vision_config=dict(model_type="pixtral")),
         "with a Pixtral tower is supported with one vision_feature_layer and "
         "vision_feature_select_strategy='full'"),
        (dict(vision_config=dict(model_type="clip_vision_model", hidden_act="relu")),
         "with vision hidden_act='relu' is not supported yet"),
        (dict(vision_feature_layer=5), "vision_feature_layer=5 is not supported"),
        (dict(projector_hidden_act="relu"), "projector_hidden_act='relu' is not supported yet"),
    ],
    ids=["text-family", "tower", "pixtral-default", "tower-act", "feature-layer", "projector-act"],
)  # fmt: skip
def test_unsupported_configurations_are_one_line(change, message):
    from megabridge.errors import UserError
    from megabridge.models.llava.bridge import LlavaBridge

    config = tiny_config("llava", "base", **change)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        LlavaBridge.model_config(config)
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_tp_that_does_not_divide_the_tower_heads_is_one_line():
    """The tower's heads are split over TP with the language model's: a 1-head CLIP at TP=2
    (the language model's 4 heads, 2 groups would split) is refused before anything is built
    (a ConfigError: one line, exit 2 from the CLI)."""
    from megabridge.errors import ConfigError
    from megabridge.models.config import validate_model_config
    from megabridge.models.llava.bridge import LlavaBridge

    config = tiny_config("llava", "base", vision_config=dict(num_attention_heads=1))
    cfg = LlavaBridge.model_config(config)
    cfg.tensor_model_parallel_size = 2
    message = (
        "the vision tower's 1 attention heads are not divisible by tensor_model_parallel_size=2"
    )
    with pytest.raises(ConfigError, match=message) as e:
        validate_model_config(cfg)
    assert "\n" not in str(e.value)
    cfg.vision["num_attention_heads"] = 2
    validate_model_config(cfg)  # 2 heads split


@pytest.mark.system
@pytest.mark.skipduringci  # two 2-process launches: minutes on a loaded 2-core machine
def test_logits_on_images_at_pp2(hf_dirs, images):
    """The language model over two stages, the tower on the first. (TP=2, the tower's layers
    split too: test_vision_language.py test_vision_towers_at_tp2, one launch for all towers.)"""
    images_args = [a for p in images for a in ("--image", str(p))]
    for variant in VARIANTS:
        code, result = checks.verify_cli(
            hf_dirs[variant], nproc=2, extra=["--pp", "2", *images_args]
        )
        assert code == 0 and result["max_abs_diff"] <= ATOL, (variant, result)
