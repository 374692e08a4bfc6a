"""Vision-language families (Qwen2.5-VL) against transformers' own classes.

A tiny random Qwen2_5_VLForConditionalGeneration (vision depth 2, hidden 32; a 2-layer
language model, hidden 64) with its image processor and a word-level tokenizer, and
generated images of three sizes: config round trip, bit-exact HF -> Megatron -> HF of
every tensor, logits on text and image positions within 1e-4 of transformers', perturbed
vision weights rejected, the CLI both ways, and the refusals (verify without images,
training on text-only data). Training: tests/unit_tests/data/test_vision_sft.py.
"""

from __future__ import annotations

import json

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


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return save_images(tmp_path_factory.mktemp("images"))


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
    assert len(vision) == 6 + 2 * 12, vision  # the tower: stem, merger, 12 per block
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
    assert result.ok and result.max_abs_diff <= 0.05 and result.top1_agreement >= 0.99, result


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
def test_cli_verifies_on_images(hf_dir, images, tmp_path):
    megatron = checks.to_megatron_checkpoint(hf_dir, tmp_path / "megatron")
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(hf_dir, extra=["--megatron-path", str(megatron), *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result


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
@pytest.mark.skipduringci  # two 2-process launches: minutes on a loaded 2-core machine
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_logits_on_images_at_tp2_and_pp2(hf_dir, images, layout):
    """The language model split over two processes; the vision tower replicated (TP) or on
    the first stage (PP)."""
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(hf_dir, nproc=2, extra=[*layout, *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result
