"""Tiny vision-language models saved locally with their image processor and tokenizer, and
generated test images (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from megabridge.conversion.tiny import tiny_config
from tests.hf_models import randomize

# A word-level vocabulary whose special tokens sit at the tiny config's token ids.
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]  # the two ids after VISION_TOKENS
# Real words first (the SFT tests ask about colours), then filler words w0, w1, ...
# (Not verify's prompt words, " Describe this image.": its tokens stay <unk>, as they were.)
WORDS = ["user", "assistant", "system", "what", "colour", "is", "it", "picture",
         "the", "a", "and", "?", "!", "red", "green", "blue", "yellow", "white", "black",
         "purple", "orange", "cyan", "grey"]  # fmt: skip
# Qwen2.5-VL's chat template in short: image parts become vision start, pad, end.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZES = [(40, 56), (32, 32), (24, 48)]  # (height, width): several windows, one, ragged


def _tokenizer(vocab_size: int, first_vision_id: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    filler = first_vision_id - len(SPECIALS) - len(WORDS)
    words = WORDS + [f"w{i}" for i in range(filler)]
    extra = [f"x{i}" for i in range(vocab_size - first_vision_id - len(VISION_TOKENS) - 2)]
    vocab = {w: i for i, w in enumerate(SPECIALS + words + VISION_TOKENS + CHAT_TOKENS + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=VISION_TOKENS + CHAT_TOKENS,
    )  # fmt: skip


def save_tiny_qwen2_5_vl(path: Path, *args, **kwargs) -> Path:
    """transformers' Qwen2.5-VL of the tiny config (save_tiny_vl)."""
    return save_tiny_vl("qwen2_5_vl", path, *args, **kwargs)


def save_tiny_vl(
    family: str,
    path: Path,
    variant: str = "base",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | None = None,
    processor: bool | None = None,
    vision: dict | None = None,
) -> Path:
    """transformers' model of a vision-language family's tiny config (Qwen2.5-VL, Qwen3-VL,
    Qwen3-VL-MoE), random weights, with its image processor and tokenizer files (with
    ``max_shard_size``, bytes: several safetensors files and an index); with ``processor``
    (default: Qwen2.5-VL's) its HF processor and a chat template too (AutoProcessor);
    ``vision``: vision_config fields changed from the tiny config's."""
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    config = tiny_config(family, variant)
    for name, value in (vision or {}).items():
        setattr(config.vision_config, name, value)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    randomize(model, seed)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(str(path), **shards)
    vision = config.vision_config
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size)  # fmt: skip
    images = Qwen2VLImageProcessorPil(**sizes, min_pixels=16 * 16, max_pixels=64 * 64)
    tokenizer = _tokenizer(config.text_config.vocab_size, config.vision_start_token_id)
    if processor is None:
        processor = family == "qwen2_5_vl"
    if processor:  # AutoProcessor: image processor, tokenizer and chat template together
        # video frames kept as small as the images (the default upscales a frame to 100k pixels)
        small = dict(min_pixels=16 * 16, max_pixels=64 * 64)
        if family == "qwen2_5_vl":
            videos, processor_class = Qwen2VLVideoProcessor(**sizes, **small), Qwen2_5_VLProcessor
        else:  # Qwen3-VL's processor takes its own video processor (its pixel limits: a clip's)
            clip = dict(size={"shortest_edge": 16 * 16, "longest_edge": 8 * 64 * 64})
            videos, processor_class = Qwen3VLVideoProcessor(**sizes, **clip), Qwen3VLProcessor
        processor_class(images, tokenizer, videos, chat_template=CHAT_TEMPLATE).save_pretrained(
            str(path)
        )
    else:
        tokenizer.save_pretrained(str(path))
    images.save_pretrained(str(path))  # preprocessor_config.json, as the releases have
    return Path(path)


def _word_tokenizer(vocab_size: int, specials: dict[int, str], **named):
    """A word-level tokenizer whose ``specials`` (id -> token) sit at their ids; ``named``:
    more special-token attributes (Gemma 3's boi_token, ...), each one of ``specials``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = dict(enumerate(SPECIALS + WORDS)) | specials  # real words: the SFT tests' colours
    vocab = {tokens.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", **({"extra_special_tokens": named} if named else {}),
    )  # fmt: skip
    tokenizer.add_tokens(list(specials.values()), special_tokens=True)
    return tokenizer


def save_tiny_llava(
    path: Path, variant: str = "base", seed: int = 0, dtype: torch.dtype = torch.float32,
    max_shard_size: int | None = None,
) -> Path:  # fmt: skip
    """transformers' LLaVA of the tiny config, random weights, with its processor (CLIP's or
    SigLIP's image processor at 16 x 16, a word-level tokenizer with "<image>")."""
    import transformers

    config = tiny_config("llava", variant)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config)
    randomize(model, seed)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(str(path), **shards)
    vision = config.vision_config
    side = vision.image_size
    if vision.model_type == "pixtral":  # Pixtral-12B's: every patch a token, no merging
        _save_pixtral_processor(path, config, merge=1)
        return Path(path)
    if vision.model_type == "clip_vision_model":
        images = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    else:
        images = transformers.SiglipImageProcessorPil(size={"height": side, "width": side})
    tokenizer = _word_tokenizer(config.text_config.vocab_size, {config.image_token_id: "<image>"})
    transformers.LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token="<image>", num_additional_image_tokens=int(vision.model_type == "clip_vision_model"),
    ).save_pretrained(str(path))  # fmt: skip
    return Path(path)


def save_tiny_gemma3_vl(
    path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size: int | None = None
) -> Path:
    """transformers' Gemma 3 (text + SigLIP) of the tiny config, random weights, with its
    processor (16 x 16 images, 4 image tokens between <start_of_image> and <end_of_image>)."""
    import transformers

    config = tiny_config("gemma3_vl")
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    randomize(model, seed)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(str(path), **shards)
    side = config.vision_config.image_size
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "image_token": "<image_soft_token>"}  # fmt: skip
    ids = {"boi_token": config.boi_token_index, "eoi_token": config.eoi_token_index,
           "image_token": config.image_token_index}  # fmt: skip
    turns = {248: "<start_of_turn>", 249: "<end_of_turn>"}  # the chat template's (CHAT)
    tokenizer = _word_tokenizer(
        config.text_config.vocab_size, {ids[k]: t for k, t in names.items()} | turns, **names
    )
    transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": side, "width": side}),
        tokenizer=tokenizer, image_seq_length=config.mm_tokens_per_image,
    ).save_pretrained(str(path))  # fmt: skip
    return Path(path)


def save_tiny_mistral3(
    path: Path, variant: str = "base", seed: int = 0, dtype: torch.dtype = torch.float32,
    max_shard_size: int | None = None,
) -> Path:  # fmt: skip
    """transformers' Mistral 3 of the tiny config, random weights, with its processor
    (PixtralProcessor: images resized to at most 64 pixels a side, in multiples of 8 = patch x
    merge; "[IMG]" per token, "[IMG_BREAK]" after each row, "[IMG_END]" last)."""
    import transformers

    config = tiny_config("mistral3", variant)
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(config)
    randomize(model, seed)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(str(path), **shards)
    _save_pixtral_processor(path, config, merge=config.spatial_merge_size)
    return Path(path)


def _save_pixtral_processor(path: Path, config, merge: int) -> None:
    """PixtralProcessor for a tiny Pixtral-towered model: "[IMG]" (the config's image token id)
    per token, "[IMG_BREAK]" and "[IMG_END]" at the next two ids, images at most image_size
    pixels a side in multiples of patch x ``merge``."""
    import transformers

    vision, image_id = config.vision_config, config.image_token_id
    names = {image_id: "[IMG]", image_id + 1: "[IMG_BREAK]", image_id + 2: "[IMG_END]"}
    images = transformers.PixtralImageProcessorPil(
        size={"longest_edge": vision.image_size},
        patch_size={"height": vision.patch_size, "width": vision.patch_size},
    )
    transformers.PixtralProcessor(
        image_processor=images, tokenizer=_word_tokenizer(config.text_config.vocab_size, names),
        patch_size=vision.patch_size, spatial_merge_size=merge,
    ).save_pretrained(str(path))  # fmt: skip


def with_released_experts(hf_dir: Path) -> Path:
    """Rewrite a transformers-5-saved Qwen3-VL-MoE folder's stacked experts ([E, out, in])
    in the layout of the released checkpoints ([E, in, out]), in place."""
    from safetensors.torch import load_file, save_file

    for f in hf_dir.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name] = t.transpose(1, 2).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    return hf_dir


def save_images(folder: Path, sizes=IMAGE_SIZES, seed: int = 0) -> list[Path]:
    """PNG images of the given (height, width): smooth gradients plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype("uint8")
        paths.append(folder / f"image{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220),
           "yellow": (235, 220, 30)}  # fmt: skip
DATA_SIZES = [(24, 32), (32, 32), (40, 24), (16, 48)]  # (height, width)


def colour_question(image: str, colour: str | None = None) -> dict:
    """A chat example: an image and "what colour is it ?"; the answer is its colour."""
    user = {"role": "user", "content": [{"type": "image", "image": image},
                                        {"type": "text", "text": "what colour is it ?"}]}  # fmt: skip
    return {"messages": [user] + ([{"role": "assistant", "content": colour}] if colour else [])}


def save_colour_dataset(folder: Path, count: int = 32, seed: int = 0) -> Path:
    """``folder``/train.jsonl: ``count`` image-question pairs, plain-colour PNGs (with a little
    noise) of four colours and four sizes, paths relative to the JSONL file."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        h, w = DATA_SIZES[(i // len(COLOURS)) % len(DATA_SIZES)]
        pixels = np.array(COLOURS[colour], dtype=float) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(folder / f"images/{i}.png")
        lines.append(json.dumps(colour_question(f"images/{i}.png", colour)) + "\n")
    (folder / "train.jsonl").write_text("".join(lines))
    return folder


VIDEO_FRAME_SIZE = (24, 32)  # (height, width): 6 x 8 patches, 12 video tokens per 2 frames


def save_colour_frames(folder: Path, colour: str, count: int, seed: int = 0) -> list[Path]:
    """``count`` PNG frames of one colour (a little noise each), one size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.array(COLOURS[colour], dtype=float) + rng.normal(0, 8, (*VIDEO_FRAME_SIZE, 3))
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(paths[-1])
    return paths


def colour_video_question(frames: list[str], colour: str | None = None) -> dict:
    """A chat example: a clip (its frames) and "what colour is it ?"; the answer its colour."""
    user = {"role": "user", "content": [{"type": "video", "video": frames},
                                        {"type": "text", "text": "what colour is it ?"}]}  # fmt: skip
    return {"messages": [user] + ([{"role": "assistant", "content": colour}] if colour else [])}


def save_mixed_colour_dataset(folder: Path, count: int = 12, seed: int = 0) -> Path:
    """``folder``/train.jsonl: in turn a clip (2 or 4 frames of one colour), an image and a
    text-only question ("what colour is red ?"), answered with the colour; relative paths."""
    import json

    images = save_colour_dataset(folder / "images", count=count, seed=seed) / "train.jsonl"
    image_lines = images.read_text().splitlines()
    lines = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        if i % 3 == 0:
            frames = save_colour_frames(folder / f"clips/{i}", colour, 2 + 2 * (i % 2), seed + i)
            record = colour_video_question([str(p.relative_to(folder)) for p in frames], colour)
        elif i % 3 == 1:
            record = json.loads(image_lines[i])
            record["messages"][0]["content"][0]["image"] = (
                f"images/{record['messages'][0]['content'][0]['image']}"
            )
            colour = record["messages"][1]["content"]
        else:
            record = {"messages": [{"role": "user", "content": f"what colour is {colour} ?"},
                                   {"role": "assistant", "content": colour}]}  # fmt: skip
        lines.append(json.dumps(record) + "\n")
    (folder / "train.jsonl").write_text("".join(lines))
    return folder


def _chat_template(turn: str, end: str, image: str, roles: dict[str, str]) -> str:
    """A chat template in short: ``turn`` before each message (with {role}), ``end`` after
    it, ``image`` for each image part; role names as ``roles`` rename them."""
    role = "{{ " + repr(roles) + ".get(m['role'], m['role']) }}"
    return (
        "{{ bos_token }}{% for m in messages %}" + turn.replace("{role}", role) +
        "{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image +
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        + end + "{% endfor %}{% if add_generation_prompt %}" +
        turn.replace("{role}", roles.get("assistant", "assistant")) + "{% endif %}"
    )  # fmt: skip


# Gemma 3's turns (<start_of_turn>model ... <end_of_turn>) and LLaVA 1.5's (USER: ... </s>)
CHAT = {
    "gemma3_vl": dict(turn="<start_of_turn>{role}\n", end="<end_of_turn>\n",
                      image="<start_of_image>", roles={"assistant": "model"}),
    "llava": dict(turn="{role}: ", end="</s> ", image="<image>\n",
                  roles={"user": "USER", "assistant": "ASSISTANT"}),
    # LLaVA's turns with Pixtral's image token (a word tokenizer: [INST] marks are not needed)
    "mistral3": dict(turn="{role}: ", end="</s> ", image="[IMG]", roles={}),
}  # fmt: skip


def save_tiny_family_vl(family: str, path: Path) -> Path:
    """A vision-language family's tiny model with its whole HF processor (AutoProcessor:
    image processor, tokenizer, chat template), as SFT reads it ("llava_pixtral": LLaVA with
    Pixtral-12B's tower, llava/tiny.py pixtral_mistral, and Mistral 3's chat)."""
    from transformers import AutoProcessor

    if family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        return save_tiny_vl(family, path, processor=True)
    save = {"gemma3_vl": save_tiny_gemma3_vl, "llava": save_tiny_llava,
            "mistral3": save_tiny_mistral3,
            "llava_pixtral": lambda p: save_tiny_llava(p, "pixtral_mistral")}[family]  # fmt: skip
    save(path)
    processor = AutoProcessor.from_pretrained(str(path))
    chat = CHAT["mistral3" if family == "llava_pixtral" else family]
    processor.chat_template = _chat_template(**chat)
    processor.save_pretrained(str(path))
    return Path(path)


def train_steps(s, count: int, same_batch: bool = False) -> list[float]:
    """``count`` optimizer steps of a training session (loop.setup), on successive global
    batches or all on the first one; their losses."""
    from megabridge.training.step import train_step

    losses = []
    for i in range(count):
        consumed = 0 if same_batch else i * s.cfg.train.global_batch_size
        loss, _, stepped, _ = train_step(s.cfg, s.model, s.optimizer, s.scheduler, s.train_data,
                                         consumed)  # fmt: skip
        assert stepped
        losses.append(loss)
    return losses


def lora_train_and_export(cfg, root: Path, before_merge=None):
    """Set up a LoRA run of ``cfg``, check only adapters train (the language model's, and the
    tower's layers' if peft.vision_target_modules names any), take 3 steps with falling loss,
    call ``before_merge(session)``, then write root/adapter (peft) and root/merged (HF);
    the session."""
    from megabridge.peft import lora
    from megabridge.peft.export import save_adapter
    from megabridge.training import loop, save_hf

    s = loop.setup(cfg)
    chunk = s.model[0].module  # inside DDP
    trainable = [n for n, p in chunk.named_parameters() if p.requires_grad]
    parts = ("decoder.", "vision.") if cfg.peft.vision_target_modules else ("decoder.",)
    assert trainable and all(lora.is_adapter(n) and n.startswith(parts) for n in trainable)
    assert {n.split(".")[0] for n in trainable} == {p.split(".")[0] for p in parts}
    losses = train_steps(s, 3)
    assert losses[-1] < losses[0], losses
    if before_merge is not None:
        before_merge(s)
    bridge = save_hf.bridge_for_run(cfg)
    save_adapter(s.model, bridge, root / "adapter", chunk.megabridge_peft)
    lora.merge_and_unload(s.model)
    bridge.save_hf_pretrained(s.model, root / "merged")
    return s


def parallel_vision_checks(cases: dict, work: Path, layouts: dict) -> dict:
    """One 2-process launch of tests/parallel_check.py for vision-language models (starting
    processes and importing megatron-core costs more than the checks).

    ``cases`` {name: (hf_dir, images, videos[, a Megatron checkpoint to load at each layout
    too])}, ``layouts`` {name: {"tp", "pp", "ep"}} -> {(case, layout): its record} (logits
    vs transformers' on the images, the round-tripped folder); a launch that failed is
    reported with its stderr."""
    import json

    from tests.helpers import torchrun

    plan = []
    for name, (hf_dir, images, videos, *checkpoint) in cases.items():
        for layout in layouts:
            (work / name / layout).mkdir(parents=True)
        variant = {"hf_dir": str(hf_dir), "work": str(work / name),
                   "images": [str(p) for p in images],
                   "videos": [[str(p) for p in clip] for clip in videos],
                   "checkpoint": str(checkpoint[0]) if checkpoint else None}  # fmt: skip
        plan.append({"family": name, "layouts": layouts, "variants": {"base": variant}})
    (work / "plan.json").write_text(json.dumps({"families": plan}))
    script = Path(__file__).with_name("parallel_check.py")
    launch = torchrun(2, [str(script), str(work / "plan.json")], timeout=1200)
    records = {}
    for line in launch.stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line.removeprefix("RESULT "))
            records[record["family"], record["check"]] = record
    assert launch.returncode == 0, launch.stderr[-3000:]
    return records
