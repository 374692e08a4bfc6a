"""Fine-tune the tiny Qwen2.5-VL through the CLI on 32 generated image-question pairs (plain
colour images of four sizes; the answer is the colour), then load the HF copy it saved in
transformers: it generates, and it answers the training questions better than the base."""

import pytest
import torch

from tests.helpers import losses, megabridge, train
from tests.vision_models import save_colour_dataset, save_tiny_qwen2_5_vl

pytestmark = pytest.mark.integration

STEPS = 8


def _overrides(root, hf, data) -> list[str]:
    return [
        f"checkpoint.pretrained_checkpoint={hf}", f"dataset.path={data}",
        f"train.train_iters={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "optimizer.lr=3e-3", "scheduler.lr_warmup_iters=1", "train.eval_interval=None",
        "logger.log_interval=1", "logger.tensorboard=false", f"checkpoint.save={root / 'ckpt'}",
        f"logger.log_dir={root / 'logs'}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_sft")
    hf = save_tiny_qwen2_5_vl(root / "hf")
    data = save_colour_dataset(root / "data", count=32)
    result = megabridge([
        "finetune", "--recipe", "qwen25_vl_tiny_finetune_config",
        *_overrides(root, hf, data), "checkpoint.save_hf=true",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def test_loss_decreases(run):
    got = losses(run / "logs")
    assert sorted(got) == list(range(1, STEPS + 1))
    first, last = [got[i] for i in (1, 2)], [got[i] for i in (STEPS - 1, STEPS)]
    assert max(last) < min(first), got


def _answer_loss(model, processor, data, indices) -> float:
    """Mean cross entropy of the colour word after each question, in transformers."""
    import json

    from PIL import Image

    lines = (data / "train.jsonl").read_text().splitlines()
    total = 0.0
    for i in indices:
        messages = json.loads(lines[i])["messages"]
        prompt = processor.apply_chat_template(messages[:1], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
        with Image.open(data / messages[0]["content"][0]["image"]) as image:
            inputs = processor(text=[prompt + messages[1]["content"]],
                               images=[image.convert("RGB")], return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            logits = model(**inputs).logits[0, -2]  # predicts the last token: the colour
        total += float(torch.nn.functional.cross_entropy(logits, inputs["input_ids"][0, -1]))
    return total / len(indices)


def test_hf_copy_loads_generates_and_learned_the_colours(run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    exported = run / "ckpt" / f"iter_{STEPS:07d}" / "hf"
    processor = AutoProcessor.from_pretrained(str(exported))  # the processor travelled
    model = AutoModelForImageTextToText.from_pretrained(str(exported))
    base = AutoModelForImageTextToText.from_pretrained(str(run / "hf"))
    some = range(0, 32, 3)
    assert _answer_loss(model, processor, run / "data", some) < _answer_loss(
        base, processor, run / "data", some
    )
    from PIL import Image

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    with Image.open(run / "data" / "images" / "5.png") as image:
        inputs = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.skipduringci  # one more 2-process launch each: ~2 min on a loaded 2-core machine
@pytest.mark.parametrize("layout", ["tensor", "pipeline", "data"])
def test_two_process_losses_equal_one_process(run, tmp_path, layout):
    """The language model split over two processes (TP: the tower's blocks split too; PP: the
    tower on the first stage, which alone reads the images), or the batch split (DP)."""
    overrides = _overrides(tmp_path, run / "hf", run / "data")
    split = [] if layout == "data" else [f"model.{layout}_model_parallel_size=2"]
    train(2, "qwen25_vl_tiny_finetune_config", [*overrides, *split])
    ref, got = losses(run / "logs"), losses(tmp_path / "logs")
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), (step, loss, got[step])


@pytest.mark.skipduringci  # three 1- and 2-process launches: ~3 min on a loaded 2-core machine
def test_tower_lora_at_tp2_trains_and_exports_as_at_tp1(tmp_path):
    """peft.vision_target_modules on Qwen3-VL at TP=2: the tower's adapters split like the
    language model's (the tower MLP padded 60 -> 64, its padded units on rank 1); the losses
    equal TP=1's, and the TP=2 exports (merged, peft adapter) of the TP=2 checkpoint equal
    the TP=1 ones'."""
    from safetensors.torch import load_file

    from tests.helpers import torchrun
    from tests.vision_models import save_tiny_vl

    hf = save_tiny_vl("qwen3_vl", tmp_path / "hf", processor=True, vision={"intermediate_size": 60})
    data = save_colour_dataset(tmp_path / "data", count=16)
    merged, adapters = {}, {}
    for tp in (1, 2):
        root = tmp_path / f"tp{tp}"
        train(tp, "qwen3_vl_tiny_lora_config", [
            *_overrides(root, hf, data), "train.train_iters=3", "peft.dim=4",
            "peft.vision_target_modules=linear_qkv,linear_proj,linear_fc1,linear_fc2",
            f"model.tensor_model_parallel_size={tp}",
        ])  # fmt: skip
        args = ["-m", "megabridge", "export", "--megatron-path", str(root / "ckpt"),
                "--hf-path", str(root / "merged"), "--adapter-path", str(root / "adapter"),
                "--tp", str(tp)]  # fmt: skip
        result = torchrun(tp, args)
        assert result.returncode == 0, result.stderr[-3000:]
        merged[tp] = load_file(str(root / "merged" / "model.safetensors"))
        adapters[tp] = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    ref, got = losses(tmp_path / "tp1" / "logs"), losses(tmp_path / "tp2" / "logs")
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), (step, loss, got[step])
    for one, two in ((merged[1], merged[2]), (adapters[1], adapters[2])):
        assert one.keys() == two.keys()
        for name, tensor in one.items():
            torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    down_a = "base_model.model.model.visual.blocks.0.mlp.linear_fc2.lora_A.weight"
    assert adapters[2][down_a].shape == (4, 60)  # the padded units' columns dropped
    base = load_file(str(hf / "model.safetensors"))
    qkv = next(n for n in base if n.endswith("visual.blocks.0.attn.qkv.weight"))
    assert (merged[2][qkv] - base[qkv]).abs().max() > 1e-4  # the tower's adapters trained
