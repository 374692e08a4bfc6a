"""Vision-language families (Qwen2.5-VL) against transformers' own classes.

A tiny random Qwen2_5_VLForConditionalGeneration (vision depth 2, hidden 32; a 2-layer
language model, hidden 64) with its image processor and a word-level tokenizer, and
generated images of three sizes: config round trip, bit-exact HF -> Megatron -> HF of
every tensor, logits on text and image positions within 1e-4 of transformers', perturbed
vision weights rejected, the CLI both ways, and the refusals (verify without images,
training on text-only data). Video: clips of generated frames, alone and with images in one
sample and one batch (M-RoPE temporal steps included), verify --video, and the bad clips. Training: tests/unit_tests/data/test_vision_sft.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests.helpers import megabridge
from tests.vision_models import save_images, save_tiny_qwen2_5_vl

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "hf")


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["base", "tied"])
def test_config_round_trip(variant):
    checks.config_round_trip(tiny_config("qwen2_5_vl", variant))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "variant, dtype, shards",
    [("base", torch.float32, 40_000), ("tied", torch.bfloat16, None)],
    ids=["base-fp32-sharded", "tied-bf16"],
)
def test_round_trip_bit_exact(variant, dtype, shards, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge

    source = save_tiny_qwen2_5_vl(tmp_path / "hf", variant, dtype=dtype, max_shard_size=shards)
    if shards:  # the index and its shards come back as they were
        assert len(set(json.loads((source / checks.INDEX).read_text())["weight_map"].values())) > 1
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    vision = [n for n, _ in model[0].named_parameters() if n.startswith("vision.")]
    # the tower: stem, merger, 10 per block (Megatron-Core layers: qkv, gate/up fused)
    assert len(vision) == 6 + 2 * 10, vision
    assert "vision.blocks.1.self_attention.linear_qkv.weight" in vision
    bridge.save_hf_pretrained(model, tmp_path / "back")
    checks.assert_same_hf_folder(source, tmp_path / "back")
    assert (tmp_path / "back" / "preprocessor_config.json").is_file()  # the processor travels


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_logits_on_images_match_transformers(hf_dir, images):
    from megabridge.conversion import image_inputs
    from megabridge.conversion.verify import verify

    result = verify(hf_dir, images=images)
    assert result.ok and result.max_abs_diff <= ATOL and result.top1_agreement == 1.0, result
    # every image's tokens are compared, not only the text around them
    samples = image_inputs.image_samples(hf_dir, images, {**_vision(hf_dir)})
    image_tokens = sum(int((s.input_ids == 92).sum()) for s in samples)
    assert image_tokens == 35 + 16 + 18 and result.tokens == sum(
        s.input_ids.numel() for s in samples
    )


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_logits_on_images_in_bf16(hf_dir, images):
    from megabridge.conversion.verify import verify

    result = verify(hf_dir, images=images, dtype=torch.bfloat16)
    # The tower's Megatron-Core linears add their bias after the bf16 matmul (transformers: one
    # addmm) and rotate in bf16: 2 of the tiny random model's 87 near-tied top-1 tokens flip
    # (max |diff| 0.014, mean 0.002; fp32 agrees within 1e-4 above).
    assert result.ok and result.max_abs_diff <= 0.05 and result.top1_agreement >= 0.95, result


def _vision(hf_dir) -> dict:
    config = json.loads((hf_dir / "config.json").read_text())
    return {**config["vision_config"], **{k: v for k, v in config.items() if k.endswith("_id")}}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("tensor", ["visual.blocks.0.attn.qkv", "visual.merger.mlp.2"])
def test_verify_rejects_perturbed_vision_weights(hf_dir, images, tensor, tmp_path):
    from megabridge.conversion.verify import verify

    bad_hf = checks.perturbed_copy(hf_dir, tmp_path / "bad_hf", tensor=tensor)
    bad = verify(hf_dir, checks.to_megatron_checkpoint(bad_hf, tmp_path / "bad"), images=images)
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad


@pytest.mark.unit
def test_mrope_positions_match_transformers(hf_dir):
    from transformers import AutoModelForImageTextToText

    from megabridge.models.vision import mrope_positions

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
    # two images (2 x 3 and 4 x 2 merged tokens) between text, two sequences
    ids = torch.tensor([[5, 90, *[92] * 6, 91, 7, 8, 90, *[92] * 8, 91, 9],
                        [5, 6, 90, *[92] * 8, 91, 7, 90, *[92] * 6, 91, 9]])  # fmt: skip
    grid = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 8, 4], [1, 4, 6]])
    expected, _ = model.model.get_rope_index(ids, (ids == 92).int(), image_grid_thw=grid)
    assert torch.equal(mrope_positions(ids, grid, 92, 2), expected)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_streamed_checkpoint_round_trip_bit_exact(hf_dir, tmp_path):
    """What `convert hf-to-megatron` and `convert megatron-to-hf` do in one process: stream."""
    from megabridge.conversion.auto_bridge import AutoBridge

    megatron = checks.to_megatron_checkpoint(hf_dir, tmp_path / "megatron")
    out = AutoBridge.from_megatron_checkpoint(megatron).save_hf_from_checkpoint(tmp_path / "back")
    assert out is not None  # streamed, not built
    checks.assert_same_hf_folder(hf_dir, tmp_path / "back")


@pytest.mark.unit
def test_more_image_tokens_than_images_is_one_line():
    from megabridge.errors import UserError
    from megabridge.models.vision import mrope_positions

    ids = torch.tensor([[5, 90, *[92] * 6, 91, 90, 92, 91]])
    with pytest.raises(UserError, match="more image tokens than there are images"):
        mrope_positions(ids, torch.tensor([[1, 4, 6]]), 92, 2)


@pytest.mark.system
def test_cli_verifies_on_images_and_videos(hf_dir, images, frames, tmp_path):
    """Images, a clip given as frames and one given as their folder: one sample each."""
    megatron = checks.to_megatron_checkpoint(hf_dir, tmp_path / "megatron")
    images_args = [a for p in images for a in ("--image", str(p))]
    videos = ["--video", *map(str, frames[:2]), "--video", str(frames[0].parent)]
    code, result = checks.verify_cli(
        hf_dir, extra=["--megatron-path", str(megatron), *images_args, *videos]
    )
    assert code == 0 and result["max_abs_diff"] <= ATOL, result
    # 3 images (35 + 16 + 18 tokens), clips of 1 and 2 temporal patches (20 and 40 tokens)
    assert result["tokens"] == 5 * 6 + 35 + 16 + 18 + 20 + 40, result


@pytest.mark.system
@pytest.mark.skipduringci  # three processes: ~5 min on a loaded 2-core machine
def test_cli_converts_both_ways_and_verifies_on_images(hf_dir, images, tmp_path):
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    run = megabridge(["convert", "hf-to-megatron", "--hf-path", str(hf_dir),
                      "--megatron-path", str(megatron)])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    run = megabridge(["convert", "megatron-to-hf", "--megatron-path", str(megatron),
                      "--hf-path", str(back)])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    checks.assert_same_hf_folder(hf_dir, back)
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(back, extra=["--megatron-path", str(megatron), *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_needs_images_and_reads_them(hf_dir, tmp_path):
    from megabridge.conversion.verify import verify
    from megabridge.errors import UserError

    with pytest.raises(UserError, match="pass --image PATH"):
        verify(hf_dir)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match=f"cannot read image {broken}"):
        verify(hf_dir, images=[broken])
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_processor / f).write_bytes((hf_dir / f).read_bytes())
    with pytest.raises(UserError, match="cannot load the image processor and tokenizer"):
        verify(no_processor, images=[broken])


@pytest.mark.system
def test_cli_refuses_training_on_mock_data_in_one_line(hf_dir):
    run = megabridge(["train", "--recipe", "qwen2_tiny_pretrain_config",
                      f"checkpoint.pretrained_checkpoint={hf_dir}", "train.train_iters=1"])  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "a vision-language model trains on dataset.type=sft (chat JSONL with images)" in (
        run.stderr
    )
    assert "Traceback" not in run.stderr


@pytest.mark.system
@pytest.mark.skipduringci  # a 2-process launch: a minute on a loaded 2-core machine
def test_logits_on_images_at_pp2(hf_dir, images, frames):
    """The language model split over two stages, the whole tower on the first; images and a
    clip."""
    images_args = [a for p in images for a in ("--image", str(p))]
    videos = ["--video", *map(str, frames)]
    code, result = checks.verify_cli(hf_dir, nproc=2, extra=["--pp", "2", *images_args, *videos])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result


@pytest.mark.system
@pytest.mark.usefixtures("single_process_megatron")  # the one-process checkpoint
def test_vision_towers_at_tp2(hf_dir, images, frames, tmp_path):
    """Every vision tower's layers split over TP=2 (heads and MLP; models/vision_encoder.py)
    with the language model's, in one 2-process launch for all towers: Qwen2.5-VL (images
    and a clip), Qwen3-VL (DeepStack), LLaVA with CLIP and with SigLIP, Gemma 3 (SigLIP). Logits on the images
    within 1e-4 of transformers', and the model built at TP=2 exports the same files; LLaVA's
    SigLIP also from a one-process Megatron checkpoint loaded at TP=2."""
    from tests.vision_models import (
        parallel_vision_checks,
        save_tiny_gemma3_vl,
        save_tiny_llava,
        save_tiny_vl,
    )

    # (hf folder, images, clips); the tower's tensors split over TP: qkv, fc1 (weights and
    # biases), proj and fc2 weights, 6 per layer (Qwen3-VL's tiny tower 3 layers, Gemma 3's
    # tiny SigLIP 1, the others 2)
    siglip = save_tiny_llava(tmp_path / "llava_siglip", "siglip_qwen2")
    cases = {
        "qwen2_5_vl": (hf_dir, images, [frames]),
        "qwen3_vl": (save_tiny_vl("qwen3_vl", tmp_path / "qwen3_vl"), images, []),
        "llava_clip": (save_tiny_llava(tmp_path / "llava_clip", "base"), images, []),
        # also its Megatron checkpoint written in one process, loaded at TP=2 (resharded)
        "llava_siglip": (
            siglip,
            images,
            [],
            checks.to_megatron_checkpoint(siglip, tmp_path / "mg"),
        ),
        "gemma3_vl": (save_tiny_gemma3_vl(tmp_path / "gemma3_vl"), images, []),
    }
    records = parallel_vision_checks(cases, tmp_path / "work", {"tp2": {"tp": 2, "pp": 1, "ep": 1}})
    for name, (source, *_) in cases.items():
        record = records[name, "tp2"]
        assert record["max_abs_diff"] <= ATOL and record["top1_agreement"] == 1.0, record
        assert record["tower_split"] == 6 * {"qwen3_vl": 3, "gemma3_vl": 1}.get(name, 2), record
        checks.assert_same_hf_folder(source, Path(record["hf_dir"]))


@pytest.mark.unit
def test_megatron_rope_on_patch_angles_is_transformers_vision_rope_in_fp32():
    """The tower hands its per-patch 2D angles to Megatron-Core's RoPE (models/vision_encoder.py):
    its rotate-half rotation must be transformers' Qwen2.5-VL vision RoPE, exactly, in fp32."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(24, 2, 16, generator=gen)  # [patches, heads, head_dim]
    angles = torch.randn(24, 8, generator=gen) * 5  # [patches, head_dim / 2]
    emb = torch.cat([angles, angles], dim=-1)
    expected, _ = apply_rotary_pos_emb_vision(q, q, emb.cos(), emb.sin())
    got = _apply_rotary_pos_emb_bshd(q.unsqueeze(1), emb[:, None, None, :]).squeeze(1)
    assert torch.equal(got, expected)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_random_init_zeroes_the_padded_tower_mlp_units():
    """A randomly initialised tower's padded MLP units (tiny Qwen2.5-VL: 60 -> 64, gated) are
    zero in fc1 (both halves, weights and biases) and in fc2's columns: they add nothing, as
    in a converted checkpoint; the real units are drawn."""
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.vit import padded_ffn
    from megabridge.models import init
    from megabridge.models.qwen2_5_vl.bridge import Qwen25VLBridge

    cfg = Qwen25VLBridge.model_config(tiny_config("qwen2_5_vl"))
    bridge = AutoBridge(Qwen25VLBridge, cfg, Qwen25VLBridge.hf_config_dict(cfg))
    (model,) = bridge.to_megatron_model(load_weights=False)
    init.initialize([model], cfg, seed=3)
    ffn = cfg.vision["intermediate_size"]
    assert padded_ffn(ffn) > ffn
    for layer in model.vision.blocks:
        fc1 = layer.mlp.linear_fc1.weight.unflatten(0, (2, -1))  # [gate; up]
        assert fc1[:, ffn:].eq(0).all() and fc1[:, :ffn].ne(0).all()
        fc2 = layer.mlp.linear_fc2.weight
        assert fc2[:, ffn:].eq(0).all() and fc2[:, :ffn].ne(0).all()
        assert layer.mlp.linear_fc1.bias.eq(0).all()  # biases start at zero anyway


@pytest.mark.unit
def test_attention_within_segments_is_one_call_per_segment():
    """Segments of one length attend together (attention_ops.attend_in_segments); the result
    is each segment's own bidirectional attention, and nothing crosses a boundary."""
    import torch.nn.functional as F

    from megabridge.models.attention_ops import attend_in_segments, segment_groups

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(23, 2, 8, generator=gen) for _ in range(3))  # [s, heads, d]
    bounds = [0, 4, 8, 13, 17, 17, 23]  # lengths 4, 4, 5, 4, 0, 6

    def attend(qs, ks, vs):  # [segments, len, n, d]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qs, ks, vs)))
        return out.transpose(1, 2)

    groups = segment_groups(bounds)
    assert [length for length, _ in groups] == [4, 5, 6]  # one call per length
    got = attend_in_segments(attend, q, k, v, groups)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            expected = attend(q[None, a:b], k[None, a:b], v[None, a:b])[0]
            torch.testing.assert_close(got[a:b], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.unit
def test_tower_mlp_padding_round_trips_and_splits_at_tp8():
    """A Qwen tower's MLP (3420 wide) is padded with zero units to 3456 in Megatron
    (conversion/vit.py padded_ffn): bit-exact back to HF, and TP=8 splits it."""
    from types import SimpleNamespace

    from megabridge.conversion import sharding, vit

    cfg = SimpleNamespace(vision={"intermediate_size": 3420, "hidden_size": 16, "num_heads": 2})
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(3420, 16, generator=gen), torch.randn(3420, 16, generator=gen)
    down, bias = torch.randn(16, 3420, generator=gen), torch.randn(3420, generator=gen)
    by_name = {type(m).__name__ + m.megatron.rsplit(".", 1)[1]: m
               for m in vit.qwen_vit_layers("visual.blocks")}  # fmt: skip
    fc1 = by_name["VisionGatedMLPweight"].hf_to_megatron([gate, up], cfg)
    assert fc1.shape == (2 * 3456, 16) and not fc1[3420:3456].any() and not fc1[-36:].any()
    assert all(torch.equal(a, b) for a, b in zip(
        by_name["VisionGatedMLPweight"].megatron_to_hf(fc1, cfg), [gate, up], strict=True))  # fmt: skip
    fc1_bias = by_name["VisionGatedMLPbias"].hf_to_megatron([bias, bias], cfg)
    assert torch.equal(by_name["VisionGatedMLPbias"].megatron_to_hf(fc1_bias, cfg)[1], bias)
    fc2 = by_name["VisionDownweight"].hf_to_megatron([down], cfg)
    assert fc2.shape == (16, 3456) and torch.equal(
        by_name["VisionDownweight"].megatron_to_hf(fc2, cfg)[0], down
    )
    pieces = [sharding.split(fc1, "gated_dim0", r, 8) for r in range(8)]
    assert all(p.shape == (2 * 432, 16) for p in pieces)
    # Qwen3-VL's plain fc1 (conversion/vit.py qwen3_vit_layers), weight and bias
    for w, hf in (("weight", gate), ("bias", bias)):
        (up,) = [m for m in vit.qwen3_vit_layers("b") if m.megatron.endswith(f"fc1.{w}")]
        padded = up.hf_to_megatron([hf], cfg)
        assert padded.shape[0] == 3456 and not padded[3420:].any()
        assert torch.equal(up.megatron_to_hf(padded, cfg)[0], hf)
    # next to a gated language model, a tower's plain fc1 is split as one block of rows
    param = torch.nn.Parameter(torch.zeros(4, 2))
    param.tensor_model_parallel, param.partition_dim = True, 0
    name = "vision.blocks.0.mlp.linear_fc1.weight"
    assert sharding.param_split(name, param, gated=True) == "gated_dim0"
    param.plain_fc1 = True  # what vision_encoder.TowerLayers marks
    assert sharding.param_split(name, param, gated=True) == "dim0"


# ------------------------------------------------------------------ video (frames)

VIDEO_TOKEN = 93


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A clip of four 32 x 40 frames (two temporal patches of 8 x 10 patches: 40 tokens)."""
    return save_images(tmp_path_factory.mktemp("frames"), sizes=[(32, 40)] * 4, seed=1)


def _pil(paths):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


@pytest.mark.unit
def test_mrope_positions_for_videos_match_transformers(hf_dir):
    """Images and videos in one sequence and across a batch; a video's frames count in steps
    of tokens_per_second (4) * seconds per temporal patch, truncated (1.0 -> 4, 0.3 -> 1.2)."""
    from transformers import AutoModelForImageTextToText

    from megabridge.models.vision import mrope_positions, video_steps

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
    video_a, video_b = [*[93] * 12], [*[93] * 8]  # 3 x 2 x 2 and 2 x 2 x 2 merged tokens
    ids = torch.tensor([[5, 90, *[92] * 6, 91, 7, 90, *video_a, 91, 9, 90, *video_b, 91],
                        [5, 90, *video_b, 91, 7, 90, *[92] * 6, 91, 9, 90, *video_a, 91]])  # fmt: skip
    images = torch.tensor([[1, 4, 6], [1, 4, 6]])
    videos = torch.tensor([[3, 4, 4], [2, 4, 4], [2, 4, 4], [3, 4, 4]])
    seconds = torch.tensor([1.0, 0.3, 2.0, 0.5])
    types = (ids == 92).int() + 2 * (ids == 93).int()
    expected, _ = model.model.get_rope_index(ids, types, images, videos, seconds)
    steps = video_steps(
        {"tokens_per_second": model.config.vision_config.tokens_per_second}, seconds
    )
    ours = mrope_positions(ids, images, 92, 2, videos, 93, steps)
    assert torch.equal(ours, expected)
    assert ours[0, 0, 11:23].unique().tolist() == [8, 12, 16]  # frames 4 positions apart


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_logits_on_video_and_image_match_transformers(hf_dir, images, frames):
    """A batch of two: an image then a clip, and another clip then the image: the tower embeds
    both kinds, each placeholder gets its own features, positions follow transformers'."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.models.vision import mrope_positions, video_steps

    processor = AutoProcessor.from_pretrained(str(hf_dir))
    image, video = (
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
    )
    texts = [f"what {image} is {video} it ?", f"what {video} is {image} it ?"]
    clips = [_pil(frames), _pil(frames[::-1])]
    inputs = processor(text=texts, images=_pil(images[1:2]) * 2, videos=clips, return_tensors="pt")
    inputs["second_per_grid_ts"] = torch.tensor([1.0, 0.5])  # steps of 4 and 2 positions
    ids = inputs["input_ids"]
    assert int((ids == VIDEO_TOKEN).sum()) == 2 * 40 and inputs["video_grid_thw"].tolist() == [
        [2, 8, 10], [2, 8, 10]
    ]  # fmt: skip
    vision = AutoBridge.from_hf_pretrained(hf_dir).model_config.vision
    positions = mrope_positions(
        ids, inputs["image_grid_thw"], 92, 2, inputs["video_grid_thw"], VIDEO_TOKEN,
        video_steps(vision, inputs["second_per_grid_ts"]),
    )  # fmt: skip
    visual = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    (chunk,) = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_model()
    with torch.no_grad():
        ours = chunk(ids, positions, None, **{k: inputs[k] for k in visual})
        hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
        theirs = hf(**{k: v for k, v in inputs.items() if k != "attention_mask"}).logits
        assert (ours - theirs).abs().max() <= ATOL
        # the clip matters: reversed frames in the first sample change its logits
        swapped = chunk(ids, positions, None, **{k: inputs[k] for k in visual[:2]},
                        pixel_values_videos=inputs["pixel_values_videos"].flip(0),
                        video_grid_thw=inputs["video_grid_thw"])  # fmt: skip
    assert (swapped - ours).abs().max() > 1e-3


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verify_on_a_clip_matches_transformers_and_sees_its_frames(hf_dir, frames, tmp_path):
    """verify --video: the clip through the model's HF processor, logits within 1e-4 on its
    text and video tokens; a tower perturbed in the Megatron checkpoint is caught on video."""
    from megabridge.conversion import image_inputs
    from megabridge.conversion.verify import verify

    clip = image_inputs.video_samples(hf_dir, [frames], _vision(hf_dir))[0]
    assert int((clip.input_ids == VIDEO_TOKEN).sum()) == 40
    assert clip.second_per_grid_ts.tolist() == [1.0]  # 2 frames per patch at 2 frames/s
    result = verify(hf_dir, videos=[frames])
    assert result.ok and result.max_abs_diff <= ATOL and result.tokens == clip.input_ids.numel()
    bad_hf = checks.perturbed_copy(hf_dir, tmp_path / "bad_hf", tensor="visual.blocks.0.attn.qkv")
    bad = verify(hf_dir, checks.to_megatron_checkpoint(bad_hf, tmp_path / "bad"), videos=[frames])
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad


@pytest.mark.unit
def test_bad_video_inputs_are_one_line(tmp_path, frames):
    from megabridge.conversion import image_inputs
    from megabridge.errors import UserError

    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(UserError, match="clip.mp4 is a video file, which megabridge does not "):
        image_inputs.frame_paths([tmp_path / "clip.mp4"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no frame images"):
        image_inputs.frame_paths([tmp_path / "empty"])
    assert image_inputs.frame_paths([frames[0].parent]) == sorted(frames)
    with pytest.raises(UserError, match="a video of 1 frame.* needs at least 2"):
        image_inputs.read_frames(frames[:1], 2)
    odd = save_images(tmp_path / "odd", sizes=[(32, 40), (40, 32)])
    with pytest.raises(UserError, match=r"x.jsonl:3: the frames of one video differ in size"):
        image_inputs.read_frames(odd, 2, "x.jsonl:3")
    with pytest.raises(UserError, match="x.jsonl:3: cannot read image .*missing.png"):
        image_inputs.read_frames([frames[0], tmp_path / "missing.png"], 2, "x.jsonl:3")


@pytest.mark.system
@pytest.mark.skipduringci  # a CLI launch (~20 s loaded); CI runs the refusal in-process above
def test_cli_video_file_is_one_line_exit_2(hf_dir, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    run = megabridge(["verify", "--hf-path", str(hf_dir), "--video", str(tmp_path / "clip.mp4")])
    assert run.returncode == 2, run.stderr[-3000:]
    assert "clip.mp4 is a video file, which megabridge does not decode: pass its frames" in (
        run.stderr
    )
    assert "Traceback" not in run.stderr


@pytest.mark.unit
def test_video_for_a_model_that_takes_none_is_one_line():
    from types import SimpleNamespace

    from megabridge.conversion.verify import _check_visual_inputs
    from megabridge.errors import UserError

    def bridge(vision):
        family = SimpleNamespace(display_name=lambda: "Some-VL")
        return SimpleNamespace(family=family, model_config=SimpleNamespace(vision=vision))

    with pytest.raises(UserError, match="--video: Some-VL takes images only here"):
        _check_visual_inputs(bridge({"kind": "gemma3"}), None, [["f0.png", "f1.png"]])
    with pytest.raises(UserError, match="--video: Some-VL is a text-only model"):
        _check_visual_inputs(bridge(None), None, [["f0.png", "f1.png"]])
    _check_visual_inputs(bridge({"kind": "qwen2_5_vl"}), None, [["f0.png", "f1.png"]])
