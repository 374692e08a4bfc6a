"""Qwen3-VL and Qwen3-VL-MoE against transformers' own classes.

Tiny random Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration (vision
depth 3 with DeepStack from blocks 0 and 2, a 4 x 4 learned position table; a 4-layer
language model, hidden 64, interleaved M-RoPE; the MoE one with 4 stacked experts and a
dense layer), with their image processor and a word-level tokenizer, on generated images of
three sizes: config round trip, bit-exact HF -> Megatron -> HF of every tensor, logits on
text and image positions within 1e-4 of transformers', perturbed tower and DeepStack merger
weights rejected, the interleaved M-RoPE layout, the PP refusal for DeepStack.
"""

from __future__ import annotations

import json

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests.vision_models import save_images, save_tiny_vl, with_released_experts

ATOL = 1e-4
FAMILIES = ["qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> the tiny model saved by transformers 5 (MoE experts [E, out, in])."""
    return {f: save_tiny_vl(f, tmp_path_factory.mktemp(f) / "hf") for f in FAMILIES}


@pytest.mark.unit
@pytest.mark.parametrize("family, variant", [("qwen3_vl", "base"), ("qwen3_vl", "tied"),
                                             ("qwen3_vl_moe", "base")])  # fmt: skip
def test_config_round_trip(family, variant):
    checks.config_round_trip(tiny_config(family, variant))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "family, variant, dtype, shards",
    [("qwen3_vl", "base", torch.float32, 60_000), ("qwen3_vl", "tied", torch.bfloat16, None),
     ("qwen3_vl_moe", "base", torch.float32, None)],
    ids=["dense-fp32-sharded", "dense-tied-bf16", "moe-fp32-released-experts"],
)  # fmt: skip
def test_round_trip_bit_exact(family, variant, dtype, shards, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge

    source = save_tiny_vl(family, tmp_path / "hf", variant, dtype=dtype, max_shard_size=shards)
    if shards:  # the index and its shards come back as they were
        assert len(set(json.loads((source / checks.INDEX).read_text())["weight_map"].values())) > 1
    if family == "qwen3_vl_moe":  # the export writes the released layout: start from it
        with_released_experts(source)
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    vision = [n for n, _ in model[0].named_parameters() if n.startswith("vision.")]
    # stem (conv weight and bias, positions), 12 per block, 6 per merger (final + 2 DeepStack)
    assert len(vision) == 3 + 3 * 12 + 3 * 6, vision
    bridge.save_hf_pretrained(model, tmp_path / "back")
    checks.assert_same_hf_folder(source, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_on_images_match_transformers(family, hf_dirs, images):
    from megabridge.conversion import image_inputs
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import verify

    hf_dir = hf_dirs[family]
    result = verify(hf_dir, images=images)
    assert result.ok and result.max_abs_diff <= ATOL and result.top1_agreement == 1.0, result
    vision = AutoBridge.from_hf_pretrained(hf_dir).model_config.vision
    samples = image_inputs.image_samples(hf_dir, images, vision)
    assert result.tokens == sum(s.input_ids.numel() for s in samples)
    # every image's tokens are compared, not only the text around them
    assert sum(int((s.input_ids == 92).sum()) for s in samples) == 35 + 16 + 18


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_moe_released_expert_layout_matches_transformers(hf_dirs, images, tmp_path):
    """The released checkpoints' [E, in, out] experts, read as transformers reads them."""
    from megabridge.conversion.verify import verify

    released = tmp_path / "released"
    released.mkdir()
    for f in hf_dirs["qwen3_vl_moe"].iterdir():
        (released / f.name).write_bytes(f.read_bytes())
    result = verify(with_released_experts(released), images=images[:1])
    assert result.ok and result.max_abs_diff <= ATOL, result


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "tensor",
    ["visual.blocks.1.attn.qkv", "visual.pos_embed", "visual.deepstack_merger_list.1.linear_fc2",
     "visual.merger.linear_fc2"],
)  # fmt: skip
def test_verify_rejects_perturbed_vision_weights(hf_dirs, images, tensor, tmp_path):
    from megabridge.conversion.verify import verify

    hf_dir = hf_dirs["qwen3_vl"]
    bad_hf = checks.perturbed_copy(hf_dir, tmp_path / "bad_hf", tensor=tensor)
    bad = verify(hf_dir, checks.to_megatron_checkpoint(bad_hf, tmp_path / "bad"), images=images)
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad


@pytest.mark.unit
def test_interleaved_mrope_matches_transformers():
    """The angles InterleavedMRoPE gives each channel are transformers' (distinct positions
    on the three rows, so a channel following the wrong row shows)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megabridge.models.vision import InterleavedMRoPE

    text = tiny_config("qwen3_vl").text_config
    hf_rope = Qwen3VLTextRotaryEmbedding(text)
    positions = torch.stack([torch.arange(7) * k for k in (1, 3, 5)]).view(3, 1, 7)
    cos, sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)  # [1, 7, head_dim]
    ours = InterleavedMRoPE(hf_rope.inv_freq, [2, 3, 3])(positions)  # [7, 1, 1, head_dim]
    assert torch.allclose(ours.squeeze(2).transpose(0, 1).cos(), cos, atol=1e-6)
    assert torch.allclose(ours.squeeze(2).transpose(0, 1).sin(), sin, atol=1e-6)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_tower_matches_transformers_deepstack_features(hf_dirs, images):
    """The tower alone: final and DeepStack features equal transformers' on a ragged batch."""
    from transformers import AutoModelForImageTextToText

    from megabridge.conversion import image_inputs
    from megabridge.conversion.auto_bridge import AutoBridge

    hf_dir = hf_dirs["qwen3_vl"]
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    tower = bridge.to_megatron_model()[0].vision
    vision = bridge.model_config.vision
    samples = image_inputs.image_samples(hf_dir, images, vision)
    pixels = torch.cat([s.pixel_values for s in samples])
    grid = torch.cat([s.image_grid_thw for s in samples])
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).model.visual
    with torch.no_grad():
        expected = hf(pixels, grid_thw=grid)
        features, deepstack = tower(pixels, grid)
    assert torch.allclose(features, expected.pooler_output, atol=1e-5)
    assert len(deepstack) == 2
    for ours, theirs in zip(deepstack, expected.deepstack_features, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.unit
def test_deepstack_layers_off_the_first_stage_are_refused():
    """At PP=2 with one LM layer on the first stage, DeepStack's second layer would be on
    the second: one clear line (the tiny model's 4 layers split 2 + 2 are fine)."""
    from megabridge.errors import UserError
    from megabridge.models.vision import VisionLanguageModel

    class _FakeDecoder:
        layers = [object()]

    model = VisionLanguageModel.__new__(VisionLanguageModel)
    torch.nn.Module.__init__(model)
    model.decoder = _FakeDecoder()
    with pytest.raises(UserError, match="first 2 language-model layers, which must all be on"):
        model._add_deepstack_hooks(2)


@pytest.mark.system
@pytest.mark.skipduringci  # 2-process launches: minutes on a loaded 2-core machine
@pytest.mark.parametrize(
    "family, layout",
    [("qwen3_vl", ["--pp", "2"]), ("qwen3_vl_moe", ["--ep", "2"]),
     ("qwen3_vl_moe", ["--tp", "2"])],
    ids=["dense-pp2", "moe-ep2", "moe-tp2"],
)  # fmt: skip
def test_logits_on_images_in_parallel(family, layout, hf_dirs, images):
    """The language model split over two processes; the tower's blocks split too (TP) or on
    the first stage with both DeepStack layers (PP: 2 + 2 layers); the experts split (EP).
    (Dense Qwen3-VL at TP=2: test_vision_language.py test_vision_towers_at_tp2, one launch
    for all towers.)"""
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(hf_dirs[family], nproc=2, extra=[*layout, *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_streamed_checkpoint_round_trip_bit_exact(tmp_path):
    """What `convert hf-to-megatron` and `convert megatron-to-hf` do: stream, the released
    MoE expert layout written back block by block."""
    from megabridge.conversion.auto_bridge import AutoBridge

    source = with_released_experts(save_tiny_vl("qwen3_vl_moe", tmp_path / "hf"))
    megatron = checks.to_megatron_checkpoint(source, tmp_path / "megatron")
    out = AutoBridge.from_megatron_checkpoint(megatron).save_hf_from_checkpoint(tmp_path / "back")
    assert out is not None  # streamed, not built
    checks.assert_same_hf_folder(source, tmp_path / "back")


# ------------------------------------------------------------------ video (frames)

VIDEO_TOKEN = 93


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A clip of four 32 x 40 frames (two temporal patches of 8 x 10 patches: 20 tokens each)."""
    return save_images(tmp_path_factory.mktemp("frames"), sizes=[(32, 40)] * 4, seed=1)


@pytest.fixture(scope="module")
def processor_dirs(tmp_path_factory):
    """family -> the tiny model with its whole HF processor (its video processor too)."""
    return {f: save_tiny_vl(f, tmp_path_factory.mktemp(f) / "hf", processor=True)
            for f in FAMILIES}  # fmt: skip


def _runs(ids: torch.Tensor, token: int) -> list[int]:
    """The lengths of the runs of ``token`` in ``ids`` [s]."""
    runs, count = [], 0
    for t in [*ids.tolist(), -1]:
        if t == token:
            count += 1
        elif count:
            runs, count = [*runs, count], 0
    return runs


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_video_and_image_logits_match_transformers(processor_dirs, images, frames):
    """A batch of two: an image then a clip, and another clip then the image. Qwen3-VL's
    processor writes each temporal patch's timestamp into the text; the positions place each
    patch as an image of its own (transformers' get_rope_index), and DeepStack adds the
    video's features as it adds the image's (both in one batch)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.models.vision import mrope_positions, video_position_args

    hf_dir = processor_dirs["qwen3_vl"]
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    image, video = ("<|vision_start|><|image_pad|><|vision_end|>",
                    "<|vision_start|><|video_pad|><|vision_end|>")  # fmt: skip
    texts = [f"what {image} is {video} it ?", f"what {video} is {image} it ?"]
    clip = [Image.open(p).convert("RGB") for p in frames]
    metadata = [{"fps": 2.0, "total_num_frames": 4}] * 2
    inputs = processor(text=texts, images=[Image.open(images[1]).convert("RGB")] * 2,
                       videos=[clip, clip[::-1]], video_metadata=metadata,
                       return_tensors="pt")  # fmt: skip
    ids = inputs["input_ids"]
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 10], [2, 8, 10]]
    assert _runs(ids[0], VIDEO_TOKEN) == [20, 20]  # two patches, their timestamps between
    vision = AutoBridge.from_hf_pretrained(hf_dir).model_config.vision
    positions = mrope_positions(
        ids, inputs["image_grid_thw"], 92, 2,
        **video_position_args(vision, inputs["video_grid_thw"], None),
    )  # fmt: skip
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    expected, _ = hf.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"]
    )
    assert torch.equal(positions, expected)
    visual = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    (chunk,) = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_model()
    with torch.no_grad():
        ours = chunk(ids, positions, None, **{k: inputs[k] for k in visual})
        theirs = hf(**{k: v for k, v in inputs.items() if k != "attention_mask"}).logits
        assert (ours - theirs).abs().max() <= ATOL
        no_deepstack = chunk(ids, positions, None, **{k: inputs[k] for k in visual[:2]},
                             pixel_values_videos=inputs["pixel_values_videos"].flip(0),
                             video_grid_thw=inputs["video_grid_thw"])  # fmt: skip
    assert (no_deepstack - ours).abs().max() > 1e-3  # the clip's pixels matter


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_on_a_clip_matches_transformers(family, processor_dirs, frames):
    """verify --video: the clip through the model's HF processor (frames sampled at its fps,
    timestamps in the text), logits within 1e-4 of transformers' on every token."""
    from megabridge.conversion import image_inputs
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import verify

    hf_dir = processor_dirs[family]
    vision = AutoBridge.from_hf_pretrained(hf_dir).model_config.vision
    (clip,) = image_inputs.video_samples(hf_dir, [frames], vision)
    assert clip.second_per_grid_ts is None and _runs(clip.input_ids[0], VIDEO_TOKEN) == [20, 20]
    result = verify(hf_dir, videos=[frames])
    assert result.ok and result.max_abs_diff <= ATOL and result.tokens == clip.input_ids.numel()


@pytest.mark.system
@pytest.mark.skipduringci  # a 2-process launch: a minute on a loaded 2-core machine
def test_verify_on_a_clip_at_tp2(processor_dirs, frames):
    """verify --video with the language model and the tower's blocks split over two ranks."""
    code, result = checks.verify_cli(
        processor_dirs["qwen3_vl"], nproc=2, extra=["--tp", "2", "--video", *map(str, frames)]
    )
    assert code == 0 and result["max_abs_diff"] <= ATOL, result
