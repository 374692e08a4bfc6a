"""Mistral 3 (Mistral3ForConditionalGeneration) against transformers' own classes.

Tiny random models (models/mistral3/tiny.py: a 2-layer Pixtral tower + a 2-layer Mistral)
with their own PixtralProcessor, and generated images of three sizes, each kept at its own
aspect: config round trip, bit-exact HF -> Megatron -> HF of every tensor, logits on text and
image positions within 1e-4 of transformers', the tower's 2D RoPE angles equal to
transformers', perturbed tower and projector weights rejected, the unsupported
configurations refused in one line; the CLI and TP=2 / PP=2 (not in CI: several processes).
"""

from __future__ import annotations

import json

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests.helpers import megabridge
from tests.vision_models import save_tiny_mistral3

ATOL = 1e-4
VARIANTS = ["base", "tied"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral3")
    return {v: save_tiny_mistral3(root / v, v) for v in VARIANTS}


@pytest.mark.unit
@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip(variant):
    checks.config_round_trip(tiny_config("mistral3", variant))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "variant, dtype, shards",
    [("base", torch.float32, 40_000), ("tied", torch.bfloat16, None)],
    ids=["base-fp32-sharded", "tied-bf16"],
)
def test_round_trip_bit_exact(variant, dtype, shards, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge

    source = save_tiny_mistral3(tmp_path / "hf", variant, dtype=dtype, max_shard_size=shards)
    if shards:
        assert len(set(json.loads((source / checks.INDEX).read_text())["weight_map"].values())) > 1
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    vision = [n for n, _ in model[0].named_parameters() if n.startswith("vision.")]
    # patch conv, ln_pre; 6 per Megatron-Core layer (2 norms, qkv, proj, fc1, fc2; no
    # biases); the projector's norm, merger and 2 linears (no biases either)
    assert len(vision) == 2 + 2 * 6 + 4, vision
    assert "vision.blocks.1.self_attention.linear_qkv.weight" in vision
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
    # each image at its own size: 40 x 56, 32 x 32, 24 x 48 pixels in 8-pixel merged tokens
    samples = image_inputs.image_samples(hf_dirs[variant], images, {"kind": "mistral3"})
    assert [int((s.input_ids == 92).sum()) for s in samples] == [35, 16, 18]
    assert result.tokens == sum(s.input_ids.numel() for s in samples)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "tensor",
    ["vision_tower.transformer.layers.0.feed_forward.down_proj",
     "multi_modal_projector.patch_merger"],
)  # fmt: skip
def test_verify_rejects_perturbed_vision_weights(hf_dirs, images, tensor, tmp_path):
    from megabridge.conversion.verify import verify

    bad_hf = checks.perturbed_copy(hf_dirs["base"], tmp_path / "bad_hf", tensor=tensor)
    bad = verify(
        hf_dirs["base"], checks.to_megatron_checkpoint(bad_hf, tmp_path / "bad"), images=images
    )
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad


@pytest.mark.unit
def test_pixtral_rope_angles_are_transformers():
    """The tower's per-patch angles (handed to Megatron-Core's rotate-half RoPE) give
    transformers' Pixtral cos / sin exactly, on a ragged grid."""
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

    from megabridge.models.mistral3.tower import pixtral_angles

    config = PixtralVisionConfig(hidden_size=64, num_attention_heads=2, rope_parameters={
        "rope_type": "axial", "rope_theta": 10000.0})  # fmt: skip
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
    cos, sin = PixtralVisionRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float), positions)
    angles = pixtral_angles(rows.flatten(), cols.flatten(), 32, 10000.0)
    assert torch.equal(angles.cos(), cos) and torch.equal(angles.sin(), sin)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")  # the tower's layers are Megatron layers
@pytest.mark.parametrize("variant, unused", [("base", set()), ("tied", {"blocks.1."})])
def test_tower_freezes_exactly_the_weights_without_gradient(variant, unused):
    """A backward through the tower (two images of different sizes) leaves exactly its
    no_gradient() weights without a gradient: the layers after vision_feature_layer."""
    from megatron.core.transformer import TransformerConfig

    from megabridge.models import vision as vision_models
    from megabridge.models.mistral3 import tiny
    from megabridge.models.mistral3.bridge import Mistral3Bridge
    from megabridge.recipes import sized

    v = sized(Mistral3Bridge, tiny.TINY[variant]).vision
    lm_config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True
    )
    tower = vision_models.TOWERS[v["kind"]](v, lm_config)
    features = tower(torch.randn(2, 3, 16, 24), torch.tensor([[16, 24], [8, 16]]))
    assert features.shape == (2 * 3 + 1 * 2, 64)  # merged 2 x 2: (16/8 x 24/8) + (8/8 x 16/8)
    features.square().sum().backward()
    no_grad = {n for n, p in tower.named_parameters() if p.grad is None}
    assert no_grad == {n for n, _ in tower.named_parameters() if n.startswith(tuple(unused))}
    assert tower.no_gradient() == tuple(sorted(unused))


@pytest.mark.unit
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(text_config=dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=4)),
         "with a 'gpt2' language model is not supported yet; supported: "),
        (dict(vision_config=dict(model_type="siglip_vision_model")),
         "with a 'siglip_vision_model' vision tower"),
        (dict(vision_config=dict(model_type="pixtral", hidden_act="relu")),
         "with vision hidden_act='relu' is not supported yet"),
        (dict(vision_feature_layer=[-1, 1]), r"vision_feature_layer=\[-1, 1\] is not supported"),
        (dict(vision_feature_layer=5), "vision_feature_layer=5 is not supported"),
        (dict(projector_hidden_act="relu"), "projector_hidden_act='relu' is not supported yet"),
    ],
    ids=["text-family", "tower", "tower-act", "feature-layers", "feature-layer", "projector-act"],
)  # fmt: skip
def test_unsupported_configurations_are_one_line(change, message):
    from megabridge.errors import UserError
    from megabridge.models.mistral3.bridge import Mistral3Bridge

    config = tiny_config("mistral3", "base", **change)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        Mistral3Bridge.model_config(config)
    assert "\n" not in str(e.value)


@pytest.mark.system
@pytest.mark.skipduringci  # three processes: minutes on a loaded 2-core machine
def test_cli_converts_both_ways_and_verifies_on_images(hf_dirs, images, tmp_path):
    source, megatron, back = hf_dirs["base"], tmp_path / "megatron", tmp_path / "back"
    run = megabridge(["convert", "hf-to-megatron", "--hf-path", str(source),
                      "--megatron-path", str(megatron)])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    run = megabridge(["convert", "megatron-to-hf", "--megatron-path", str(megatron),
                      "--hf-path", str(back)])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    checks.assert_same_hf_folder(source, back)
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(back, extra=["--megatron-path", str(megatron), *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result


@pytest.mark.system
@pytest.mark.skipduringci  # two 2-process launches: minutes on a loaded 2-core machine
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_logits_on_images_at_tp2_and_pp2(hf_dirs, images, layout):
    """The language model split over two processes; the tower's layers split too (TP: one
    head and half the MLP a rank) or the whole tower on the first stage (PP)."""
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(hf_dirs["base"], nproc=2, extra=[*layout, *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result
