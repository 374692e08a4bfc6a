"""Vision-language SFT (training/data/vision_sft.py) on the tiny Qwen2.5-VL, against transformers.

The data rendered by the model's own processor (answers only in the loss, image tokens
expanded), a padded micro-batch of images of different sizes whose per-token loss equals
transformers' own, the freezing options, LoRA exported merged and as a peft adapter, and
the bad inputs (one line each). Video (Qwen2.5-VL, clips of frames): the rendered clip,
a padded batch of a clip, an image and a text-only example against transformers' loss, a
few training steps whose loss falls, and the bad clips.
"""

from __future__ import annotations

import json

import pytest
import torch

from megabridge.errors import ConfigError, UserError
from tests.helpers import megabridge
from tests.vision_models import (
    colour_question,
    colour_video_question,
    lora_train_and_export,
    save_colour_dataset,
    save_colour_frames,
    save_images,
    save_mixed_colour_dataset,
    save_tiny_qwen2_5_vl,
    train_steps,
)

IMAGE_TOKEN = 92
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "hf")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return save_colour_dataset(tmp_path_factory.mktemp("colours"), count=16)


@pytest.fixture(scope="module")
def processor(hf_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(hf_dir), local_files_only=True)


def _render(processor, record, folder):
    from megabridge.training.data import vision_sft

    return vision_sft.render(processor, record, f"{folder}/train.jsonl:1", folder)


@pytest.mark.unit
def test_answers_and_expanded_image_tokens(processor, data_dir):
    """Two images of different sizes, two assistant turns: every image's tokens are there,
    and the loss covers the two answers (with the turn's end) and nothing else."""
    record = colour_question("images/0.png")
    record["messages"][0]["content"].insert(1, {"type": "image", "image": "images/8.png"})
    record["messages"] += [
        {"role": "assistant", "content": "red and blue"},
        {"role": "user", "content": "what colour is the picture ?"},
        {"role": "assistant", "content": [{"type": "text", "text": "red !"}]},
    ]
    example = _render(processor, record, data_dir)
    assert [tuple(g) for g in example.grids] == [(1, 6, 8), (1, 10, 6)]
    assert int((example.ids == IMAGE_TOKEN).sum()) == 6 * 8 // 4 + 10 * 6 // 4
    answers = processor.tokenizer.decode(example.ids[example.answer]).split()
    assert answers == ["red", "and", "blue", "<|im_end|>", "red", "!", "<|im_end|>"]
    assert example.images == (str(data_dir / "images/0.png"), str(data_dir / "images/8.png"))


@pytest.mark.unit
def test_processors_that_do_not_report_their_expansion_give_the_same_example(
    processor, data_dir, monkeypatch
):
    """transformers before 5.10 does not say where each image's tokens went: the example is
    then aligned token by token, to the same ids and answers."""
    record = colour_question("images/0.png", "red and blue")
    record["messages"][0]["content"].append({"type": "image", "image": "images/8.png"})
    reported = _render(processor, record, data_dir)
    from megabridge.training.data import vision_sft

    monkeypatch.setattr(vision_sft, "reports_expansion", lambda processor: False)
    aligned = _render(processor, record, data_dir)
    assert (aligned.ids == reported.ids).all() and (aligned.answer == reported.answer).all()
    assert aligned.answer.sum() == 4  # red and blue <|im_end|>


def _dataset(hf_dir, processor, data_dir, indices):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training.data import sft, vision_sft

    records = [sft.read_records(data_dir / "train.jsonl")[i] for i in indices]
    examples = vision_sft.tokenize(records, processor, 64)
    model_cfg = AutoBridge.from_hf_pretrained(hf_dir).model_config
    return vision_sft.PaddedVisionSFTDataset(examples, 64, 0, processor, model_cfg)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_mixed_size_batch_loss_matches_transformers(hf_dir, processor, data_dir):
    """One padded micro-batch of three images of three sizes: Megatron's per-token loss on the
    answer tokens equals transformers' cross entropy on the same batch."""
    from transformers import AutoModelForImageTextToText

    from megabridge.conversion.auto_bridge import AutoBridge

    data = _dataset(hf_dir, processor, data_dir, [0, 4, 8])
    batch = data.collate([data[i] for i in range(3)])
    assert batch["image_grid_thw"].shape == (3, 3) and len(set(batch["image_grid_thw"][:, 1])) > 1
    assert batch["position_ids"].shape == (3, 3, 64)  # M-RoPE rows, batch, sequence
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    (chunk,) = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_model()
    with torch.no_grad():
        ours = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **images)
        hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        logits = hf(input_ids=batch["tokens"], mm_token_type_ids=(batch["tokens"] == IMAGE_TOKEN)
                    .int(), **images).logits  # fmt: skip
        theirs = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none"
        )
    mask = batch["loss_mask"].bool()
    assert mask.sum() == 3 * 2  # the colour and <|im_end|> of each answer
    assert (ours[mask] - theirs[mask]).abs().max() <= ATOL


def _config(hf_dir, data_dir, root, *extra):
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    return apply_overrides(get_recipe("qwen25_vl_tiny_finetune_config"), [
        f"checkpoint.pretrained_checkpoint={hf_dir}", f"dataset.path={data_dir}",
        "optimizer.lr=1e-2", "scheduler.lr_warmup_iters=0", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.eval_interval=None", "logger.tensorboard=false",
        f"checkpoint.save={root / 'ckpt'}", f"logger.log_dir={root / 'logs'}", *extra,
    ])  # fmt: skip


def _part(name: str) -> str:
    if name.startswith("vision.merger."):
        return "projection"
    return "tower" if name.startswith("vision.") else "language"


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "frozen", [("tower",), ("language", "projection")], ids=["tower", "language+projection"]
)
def test_frozen_parts_stay_bit_equal_and_the_rest_trains(hf_dir, data_dir, tmp_path, frozen):
    from megabridge.training import loop

    flags = {"tower": "freeze_vision_model", "projection": "freeze_vision_projection",
             "language": "freeze_language_model"}  # fmt: skip
    s = loop.setup(_config(hf_dir, data_dir, tmp_path, *(f"model.{flags[p]}=true" for p in frozen)))
    chunk = s.model[0].module  # inside DDP
    before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    trainable = {id(p) for p in chunk.parameters() if p.requires_grad}
    assert {id(p) for g in s.optimizer.param_groups for p in g["params"]} == trainable
    train_steps(s, 2)
    for name, p in chunk.named_parameters():
        same = torch.equal(p.detach(), before[name])
        assert same == (_part(name) in frozen), name
        assert p.requires_grad == (_part(name) not in frozen), name


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_lora_trains_the_language_model_and_exports_merged_and_peft(
    hf_dir, processor, data_dir, tmp_path
):
    """LoRA: adapters on the language model only (the tower frozen); the merged export and the
    peft adapter on transformers' own VLM give the same logits on an image."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg = _config(hf_dir, data_dir, tmp_path, "peft.method=lora", "peft.dim=4")
    lora_train_and_export(cfg, tmp_path)

    inputs = processor(
        text=[processor.apply_chat_template(colour_question("x")["messages"], add_generation_prompt=True,
                                            tokenize=False)],
        images=[_image(data_dir, 8)], return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
        merged_logits = merged(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        base_logits = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        adapter_logits = adapted(**inputs).logits
    assert (merged_logits - adapter_logits).abs().max() <= ATOL
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapters trained
    adapted_names = [n for n, _ in adapted.named_parameters() if ".lora_" in n]
    assert len(adapted_names) == 2 * 7 * 2  # A and B of 7 projections in 2 layers: no tower ones
    assert all(".language_model.layers." in n for n in adapted_names)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_lora_on_the_tower_exports_merged_and_peft(hf_dir, processor, data_dir, tmp_path):
    """peft.vision_target_modules: adapters on the tower's blocks too. megabridge's model with
    its adapters, its merged export in transformers, and the peft adapter on transformers' own
    VLM give the same logits on an image: the tower's MLP, padded from 60 to 64 units in
    Megatron, gets no adapter on the padded units (they would leak into megabridge's logits
    and be dropped from the export)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    targets = "linear_qkv,linear_proj,linear_fc1,linear_fc2"
    cfg = _config(hf_dir, data_dir, tmp_path, "peft.method=lora", "peft.dim=4",
                  f"peft.vision_target_modules={targets}")  # fmt: skip
    data = _dataset(hf_dir, processor, data_dir, [8])
    batch = data.collate([data[0]])
    real = batch["tokens"][0] != processor.tokenizer.pad_token_id  # [s]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    ours = {}

    def megabridge_logits(s):
        chunk = s.model[0].module
        fc1 = chunk.vision.blocks[0].mlp.linear_fc1
        assert fc1.lora_b.abs().sum() > 0 and fc1.live.shape == (2 * 64, 1)  # [gate; up] rows
        with torch.no_grad():
            ours["logits"] = chunk(batch["tokens"], batch["position_ids"], None, **images)[0, real]

    lora_train_and_export(cfg, tmp_path, megabridge_logits)
    hf_inputs = dict(
        input_ids=batch["tokens"][:, real],
        mm_token_type_ids=(batch["tokens"][:, real] == IMAGE_TOKEN).int(),
        **images,
    )
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
        merged_logits = merged(**hf_inputs).logits[0]
        base = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        adapter_logits = adapted(**hf_inputs).logits[0]
    assert (ours["logits"] - merged_logits).abs().max() <= ATOL
    assert (merged_logits - adapter_logits).abs().max() <= ATOL
    merged_sd, base_sd = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "merged",
                                                                             hf_dir))  # fmt: skip
    qkv = "visual.blocks.1.attn.qkv.weight"  # as both files name it
    assert (merged_sd[qkv] - base_sd[qkv]).abs().max() > 1e-4  # the tower's adapters trained
    assert merged_sd["visual.blocks.0.mlp.up_proj.weight"].shape[0] == 60
    names = [n for n, _ in adapted.named_parameters() if ".lora_" in n]
    # A and B of 7 projections in 2 LM layers, of 5 (qkv, proj, gate, up, down) in 2 blocks
    assert len(names) == 2 * 7 * 2 + 2 * 5 * 2
    assert sum(".visual.blocks." in n for n in names) == 2 * 5 * 2


def _image(folder, i):
    from PIL import Image

    with Image.open(folder / f"images/{i}.png") as image:
        return image.convert("RGB")


# ------------------------------------------------------------------ bad input


@pytest.mark.unit
@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda r: r["messages"][0]["content"][0].update(image="images/missing.png"),
            "cannot read image .*missing.png",
        ),
        (
            lambda r: r["messages"][0]["content"][0].update(image="train.jsonl"),
            "cannot read image .*train.jsonl",
        ),
        (
            lambda r: r["messages"][0]["content"][1].update(text="what is <|image_pad|> ?"),
            "has 2 image placeholders .* but 1 image parts",
        ),
        (
            lambda r: r["messages"][0]["content"].append({"type": "video", "video": "a.mp4"}),
            "messages\\[0\\] has a video part; .* takes images only",
        ),
        (
            lambda r: r["messages"][0]["content"].append({"type": "audio"}),
            "has a part of type 'audio'",
        ),
        (lambda r: r["messages"].pop(), "no assistant message"),
    ],
    ids=["missing", "unreadable", "more-placeholders", "video", "audio", "no-answer"],
)
def test_bad_multimodal_examples_are_one_line(processor, data_dir, change, message):
    record = colour_question("images/0.png", "red")
    change(record)
    with pytest.raises(UserError, match=message) as e:
        _render(processor, record, data_dir)
    assert "\n" not in str(e.value) and "train.jsonl:1" in str(e.value)


@pytest.mark.unit
def test_image_parts_for_a_text_only_model_are_one_line(data_dir):
    from megabridge.training.data import sft

    with pytest.raises(UserError, match="has image or video parts, but the model is text-only"):
        sft.render(None, colour_question("images/0.png", "red"), "train.jsonl:1")


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.type=mock"], "trains on dataset.type=sft .*, not mock"),
        (["dataset.packed=true"], "packed samples are not supported yet .*dataset.packed=false"),
        (
            ["peft.method=lora", "peft.vision_target_modules=qkv"],
            r"peft.vision_target_modules: unknown 'qkv'; expected Megatron names \(linear_qkv",
        ),
        (
            ["peft.method=dora", "peft.vision_target_modules=linear_qkv"],
            "vision_target_modules with peft.method=dora is not supported yet",
        ),
    ],
    ids=["mock-data", "packed", "tower-lora-hf-name", "tower-dora"],
)
def test_vision_training_refusals(overrides, message):
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides, validate

    cfg = apply_overrides(get_recipe("qwen25_vl_tiny_finetune_config"), overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 2)


@pytest.mark.unit
def test_an_untested_tower_does_not_train():
    from megabridge.recipes import get_recipe
    from megabridge.training.config import validate

    cfg = get_recipe("qwen25_vl_tiny_finetune_config")
    cfg.model.family = "another"
    with pytest.raises(ConfigError, match=r"vision-language model \(another\) is not supported"):
        validate(cfg, 1)


@pytest.mark.unit
def test_tower_lora_for_a_model_without_a_tower():
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides, validate

    cfg = apply_overrides(get_recipe("qwen2_tiny_pretrain_config"),
                          ["peft.method=lora", "peft.vision_target_modules=linear_fc1"])  # fmt: skip
    with pytest.raises(ConfigError, match="peft.vision_target_modules: the model has no vision"):
        validate(cfg, 1)


@pytest.mark.unit
def test_freezing_a_tower_that_is_not_there():
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides, validate

    cfg = apply_overrides(get_recipe("qwen2_tiny_pretrain_config"), ["model.freeze_vision_model=1"])
    with pytest.raises(ConfigError, match="model.freeze_vision_model: the model has no vision"):
        validate(cfg, 1)


@pytest.mark.system
def test_cli_missing_image_is_one_line_exit_2(hf_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(colour_question("gone.png", "red")) + "\n")
    run = megabridge(["finetune", "--recipe", "qwen25_vl_tiny_finetune_config",
                      "--pretrained", str(hf_dir), f"dataset.path={tmp_path}",
                      f"checkpoint.save={tmp_path / 'ckpt'}"])  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cannot read image {tmp_path / 'gone.png'}" in run.stderr
    assert "Traceback" not in run.stderr


# ------------------------------------------------------------------ video (frames)

VIDEO_TOKEN = 93


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    return save_mixed_colour_dataset(tmp_path_factory.mktemp("mixed"), count=12)


def _render_video(processor, record, folder):
    from megabridge.training.data import vision_sft

    return vision_sft.render(processor, record, f"{folder}/train.jsonl:1", folder, videos=True)


@pytest.mark.unit
def test_clip_and_image_in_one_example(processor, data_dir, monkeypatch):
    """A clip of four frames (two temporal patches of 6 x 8) at 4 frames/s and an image: their
    tokens expanded, the frames in order, the loss on the answer; the same example when the
    processor does not report its expansion."""
    from megabridge.training.data import vision_sft

    frames = save_colour_frames(data_dir / "clip", "red", 4)
    record = colour_video_question(["clip/0000.png", "clip/0001.png", "clip/0002.png",
                                    "clip/0003.png"], "red and blue")  # fmt: skip
    record["messages"][0]["content"][0]["fps"] = 4
    record["messages"][0]["content"].insert(0, {"type": "image", "image": "images/0.png"})
    example = _render_video(processor, record, data_dir)
    assert example.video_grids == ((2, 6, 8),) and example.grids == ((1, 6, 8),)
    assert int((example.ids == VIDEO_TOKEN).sum()) == 2 * 6 * 8 // 4
    assert int((example.ids == IMAGE_TOKEN).sum()) == 6 * 8 // 4
    assert example.videos == (tuple(str(p) for p in frames),)
    assert example.video_seconds == (0.5,)  # 2 frames per temporal patch at 4 frames/s
    answers = processor.tokenizer.decode(example.ids[example.answer]).split()
    assert answers == ["red", "and", "blue", "<|im_end|>"]
    monkeypatch.setattr(vision_sft, "reports_expansion", lambda processor: False)
    aligned = _render_video(processor, record, data_dir)
    assert (aligned.ids == example.ids).all() and (aligned.answer == example.answer).all()


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_batch_of_clip_image_and_text_loss_matches_transformers(hf_dir, processor, mixed_dir):
    """One padded micro-batch of a 4-frame clip, an image and a text-only example: Megatron's
    per-token loss on the answers equals transformers' on the same batch (its own M-RoPE)."""
    from transformers import AutoModelForImageTextToText

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training.data import sft, vision_sft

    records = sft.read_records(mixed_dir / "train.jsonl")[3:6]  # clip (4 frames), image, text
    examples = vision_sft.tokenize(records, processor, 64, videos=True)
    model_cfg = AutoBridge.from_hf_pretrained(hf_dir).model_config
    data = vision_sft.PaddedVisionSFTDataset(examples, 64, 0, processor, model_cfg)
    batch = data.collate([data[i] for i in range(3)])
    assert batch["video_grid_thw"].tolist() == [[2, 6, 8]] and batch["image_grid_thw"].shape[0] == 1
    assert batch["second_per_grid_ts"].tolist() == [1.0]  # 2 frames/s: positions 4 apart
    visual = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                    "video_grid_thw")}  # fmt: skip
    (chunk,) = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_model()
    tokens = batch["tokens"]
    with torch.no_grad():
        ours = chunk(tokens, batch["position_ids"], None, labels=batch["labels"], **visual)
        hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        types = (tokens == IMAGE_TOKEN).int() + 2 * (tokens == VIDEO_TOKEN).int()
        logits = hf(input_ids=tokens, mm_token_type_ids=types,
                    second_per_grid_ts=batch["second_per_grid_ts"], **visual).logits  # fmt: skip
        theirs = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none"
        )
    mask = batch["loss_mask"].bool()
    assert mask.sum() == 3 * 2  # the colour and <|im_end|> of each answer
    assert (ours[mask] - theirs[mask]).abs().max() <= ATOL


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_sft_on_clips_images_and_text_lowers_the_loss(hf_dir, mixed_dir, tmp_path):
    from megabridge.training import loop

    s = loop.setup(_config(hf_dir, mixed_dir, tmp_path, "dataset.valid_fraction=0"))
    assert sum(bool(e.videos) for e in s.train_data.examples) == 4
    losses = train_steps(s, 3)
    assert losses[-1] < losses[0], losses


def _clip_record(frames: list[str]) -> dict:
    return colour_video_question(frames, "red")


@pytest.mark.unit
@pytest.mark.parametrize(
    "frames, videos, message",
    [
        (["clip/0000.png", "clip/gone.png"], True, "cannot read image .*gone.png"),
        (["odd"], True, "the frames of one video differ in size"),
        (["clip/0000.png"], True, "a video of 1 frame.* needs at least 2"),
        (["clip.mp4"], True, "clip.mp4 is a video file, which megabridge does not decode"),
        (["clip/0000.png", "clip/0001.png"], False, "has a video part; .* takes images only"),
    ],
    ids=["missing-frame", "sizes", "too-few", "video-file", "model-without-video"],
)
def test_bad_clips_are_one_line(processor, data_dir, frames, videos, message):
    from megabridge.training.data import vision_sft

    save_colour_frames(data_dir / "clip", "red", 2)
    save_images(data_dir / "odd", sizes=[(24, 32), (32, 24)])
    with pytest.raises(UserError, match=message) as e:
        vision_sft.render(processor, _clip_record(frames), f"{data_dir}/train.jsonl:1", data_dir,
                          videos=videos)  # fmt: skip
    assert "\n" not in str(e.value) and "train.jsonl:1" in str(e.value)


@pytest.mark.unit
@pytest.mark.parametrize("fps", [0, "fast", True])
def test_a_clip_fps_that_is_not_a_positive_number_is_one_line(processor, data_dir, fps):
    save_colour_frames(data_dir / "clip", "red", 2)
    record = _clip_record(["clip/0000.png", "clip/0001.png"])
    record["messages"][0]["content"][0]["fps"] = fps
    with pytest.raises(UserError, match=r"train.jsonl:1: messages\[0\]: a video's 'fps' must be"):
        _render_video(processor, record, data_dir)
