"""Vision-language SFT (training/data/vision_sft.py) on the tiny Qwen2.5-VL, against transformers.

The data rendered by the model's own processor (answers only in the loss, image tokens
expanded), a padded micro-batch of images of different sizes whose per-token loss equals
transformers' own, the freezing options, LoRA exported merged and as a peft adapter, and
the bad inputs (one line each).
"""

from __future__ import annotations

import json

import pytest
import torch

from megabridge.errors import ConfigError, UserError
from tests.helpers import megabridge
from tests.vision_models import colour_question, save_colour_dataset, save_tiny_qwen2_5_vl

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


def _steps(s, count: int) -> list[float]:
    from megabridge.training.step import train_step

    losses = []
    for i in range(count):
        loss, _, stepped, _ = train_step(s.cfg, s.model, s.optimizer, s.scheduler, s.train_data,
                                         i * s.cfg.train.global_batch_size)  # fmt: skip
        assert stepped
        losses.append(loss)
    return losses


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
    _steps(s, 2)
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

    from megabridge.peft import lora
    from megabridge.peft.export import save_adapter
    from megabridge.training import loop, save_hf

    cfg = _config(hf_dir, data_dir, tmp_path, "peft.method=lora", "peft.dim=4")
    s = loop.setup(cfg)
    chunk = s.model[0].module  # inside DDP
    trainable = [n for n, p in chunk.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter(n) and n.startswith("decoder.") for n in trainable)
    losses = _steps(s, 3)
    assert losses[-1] < losses[0], losses
    bridge = save_hf.bridge_for_run(cfg)
    save_adapter(s.model, bridge, tmp_path / "adapter", chunk.megabridge_peft)
    lora.merge_and_unload(s.model)
    bridge.save_hf_pretrained(s.model, tmp_path / "merged")

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
    ],
    ids=["mock-data", "packed"],
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
    cfg.model.vision = {**cfg.model.vision, "kind": "another"}
    with pytest.raises(ConfigError, match=r"vision-language model \(qwen2_5_vl\) is not supported"):
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
