"""SFT examples with images, for vision-language models: rendered by the model's own processor.

A line is a chat example whose message contents may be lists of parts, as transformers'
processors take them::

    {"messages": [
      {"role": "user", "content": [{"type": "image", "image": "cats/1.png"},
                                   {"type": "text", "text": "What is this?"}]},
      {"role": "assistant", "content": "A cat."}]}

An image is a local file; a relative path is relative to the JSONL file's folder. The
processor (``AutoProcessor`` of the HF folder the run starts from: chat template, tokenizer,
image processor) renders the conversation, puts one placeholder per image, and expands
each placeholder to as many image tokens as the tower gives that image. The loss covers
the assistant turns exactly as for text (sft.py): the turns are found in the rendered text,
and shifted by the placeholders' expansion (the processor reports where each one went).

Examples are tokenized when the run starts (images are read then, to count their tokens);
their pixels are made again by the image processor when a batch needs them, so a large
dataset's pixels are never all in memory. Samples are padded, one example each; a
micro-batch concatenates its images' patches (``pixel_values``), has one
``image_grid_thw`` row per image, and M-RoPE positions per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megabridge.errors import ConfigError, UserError
from megabridge.models.vision import mrope_positions
from megabridge.training.data import sft
from megabridge.training.data.packing import PaddedSFTDataset
from megabridge.training.data.tokenizer import tokenizer_path

PART_TYPES = ("text", "image", "video")


@dataclass
class VisionExample(sft.Example):
    images: tuple[str, ...] = ()  # absolute paths, in the order of their placeholders
    grids: tuple[tuple[int, ...], ...] = ()  # the image processor's grid of each, at load


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_processor(cfg):
    """transformers' AutoProcessor of the run's HF folder (tokenizer.path or the pretrained one)."""
    from transformers import AutoProcessor

    path = tokenizer_path(cfg)
    if path is None:
        raise ConfigError(
            "dataset.type=sft for a vision-language model needs its HF processor: set "
            "checkpoint.pretrained_checkpoint (or tokenizer.path) to the HF model folder"
        )
    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for missing files
        hint = (
            " (install torchvision: pip install 'megabridge[vision]')" if _no_torchvision() else ""
        )
        raise UserError(f"cannot load the HF processor of {path}: {_first_line(e)}{hint}") from None
    if not hasattr(processor, "image_processor") or not getattr(processor, "chat_template", None):
        raise UserError(
            f"{path}: its processor ({type(processor).__name__}) has no image processor or no "
            "chat template (processor_config.json, chat_template.jinja)"
        )
    return processor


def _no_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is None


def _read_image(path: Path, where: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read image {path}: {_first_line(e)}") from None


def _image_path(part: dict, where: str, folder: Path) -> Path:
    value = part.get("image", part.get("path"))
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: an image part needs 'image': a local file path")
    path = Path(value.removeprefix("file://"))
    if value.startswith(("http://", "https://")):
        raise UserError(f"{where}: image {value}: only local files are read (download it first)")
    return path if path.is_absolute() else folder / path


def parse_messages(record: dict, where: str, folder: Path) -> tuple[list[dict], list[Path]]:
    """The messages (parts checked) and their images' paths, in order."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    images = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"{where}: messages[{i}] has no 'role' string")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise UserError(f"{where}: messages[{i}] 'content' must be a string or a list of parts")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise UserError(
                    f"{where}: messages[{i}] has a part of type {kind!r} (expected one of "
                    f"{', '.join(PART_TYPES)})"
                )
            if kind == "video":
                raise UserError(
                    f"{where}: messages[{i}] has a video part; this model's training takes "
                    "images only (video is not supported yet)"
                )
            if kind == "image":
                images.append(_image_path(part, where, folder))
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return messages, images


def _expanded(offset: int, replacements: list[dict]) -> int:
    """A character offset of the rendered text, in the text with its placeholders expanded."""
    shift = 0
    for r in replacements:
        start, end = r["span"]
        if end <= offset:
            shift += (r["new_span"][1] - r["new_span"][0]) - (end - start)
    return offset + shift


def render(processor, record: dict, where: str, folder: Path) -> VisionExample:
    """One JSONL record -> a VisionExample (ids with expanded image tokens, answer mask)."""
    messages, paths = parse_messages(record, where, folder)
    full, spans = sft.assistant_spans(processor, messages, where)
    placeholders = full.count(processor.image_token)
    if placeholders != len(paths):
        raise UserError(
            f"{where}: the rendered conversation has {placeholders} image placeholders "
            f"({processor.image_token}) but {len(paths)} image parts"
        )
    images = [_read_image(p, where) for p in paths]
    reports = reports_expansion(processor)
    extra = dict(return_offsets_mapping=True, return_text_replacement_offsets=True)
    try:
        out = processor(text=[full], images=images or None, **(extra if reports else {}))
    except ValueError as e:  # the processor's own count checks
        raise UserError(f"{where}: {_first_line(e)}") from None
    if reports:
        replacements = out["text_replacement_offsets"][0]
        spans = [(_expanded(s, replacements), _expanded(e, replacements)) for s, e in spans]
        answer = [any(s <= start < e for s, e in spans) for start, _ in out["offset_mapping"][0]]
    else:
        answer = _aligned_answers(processor, full, spans, out["input_ids"][0], where)
    if not any(answer[1:]):
        raise UserError(f"{where}: the answer is empty, so nothing to train on")
    grids = tuple(tuple(g) for g in out["image_grid_thw"].tolist()) if images else ()
    return VisionExample(
        np.asarray(out["input_ids"][0], dtype=np.int64), np.asarray(answer, dtype=bool), where,
        tuple(str(p) for p in paths), grids,
    )  # fmt: skip


def reports_expansion(processor) -> bool:
    """Whether the processor says where each placeholder went (transformers 5.10 and later)."""
    return hasattr(processor, "get_text_with_replacements")


def _aligned_answers(processor, full: str, spans, expanded: list[int], where: str) -> list[bool]:
    """The answer mask of the expanded ids, for a processor that does not report its
    expansion: the text tokenized as rendered (one token per placeholder), then walked along
    the expanded ids, each placeholder standing for its run of image tokens."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    answer, j = [], 0
    for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if token == image_id:
            run = j
            while run < len(expanded) and expanded[run] == image_id:
                run += 1
            answer += [False] * (run - j)
            j = run
            continue
        if j >= len(expanded) or expanded[j] != token:
            raise UserError(
                f"{where}: the processor expands images into more than image tokens; this "
                "transformers version does not say how (upgrade to transformers 5.10 or later)"
            )
        answer.append(any(s <= start < e for s, e in spans))
        j += 1
    return answer


def tokenize(records, processor, seq_length: int) -> list[VisionExample]:
    """sft.tokenize with the processor: image paths are relative to each record's file."""
    rendered = [
        (where, render(processor, record, where, Path(where.rpartition(":")[0]).parent))
        for where, record in records
    ]
    return sft.keep_fitting(rendered, len(records), seq_length)


class PaddedVisionSFTDataset(PaddedSFTDataset):
    """Padded samples with their images' pixels; ``collate`` adds M-RoPE positions."""

    def __init__(self, examples, seq_length: int, seed: int, processor, model_cfg):
        super().__init__(examples, seq_length, seed)
        self.image_processor = processor.image_processor
        self.vision = model_cfg.vision
        self.mrope = model_cfg.position_embedding_type == "mrope"

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        example = self.examples[self.order[index]]
        if example.images:
            images = [_read_image(Path(p), example.where) for p in example.images]
            pixels = self.image_processor(images=images, return_tensors="pt")
            grid = pixels["image_grid_thw"]
            if tuple(tuple(g) for g in grid.tolist()) != example.grids:
                raise UserError(f"{example.where}: an image changed since the run started")
            sample["pixel_values"], sample["image_grid_thw"] = pixels["pixel_values"], grid
        return sample

    def collate(self, samples: list[dict]) -> dict:
        """Stacked tokens; the images' patches and grids concatenated; positions [3, b, s]."""
        batch = {
            k: torch.stack([s[k] for s in samples])
            for k in ("tokens", "labels", "loss_mask", "position_ids")
        }
        with_images = [s for s in samples if "pixel_values" in s]
        grid = None
        if with_images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
            batch["image_grid_thw"] = grid = torch.cat([s["image_grid_thw"] for s in with_images])
        if self.mrope:  # positions follow the image grids (models/vision.py)
            batch["position_ids"] = mrope_positions(
                batch["tokens"], grid, self.vision["image_token_id"],
                self.vision["spatial_merge_size"],
            )  # fmt: skip
        return batch


def build(cfg, seq: int):
    """(train, validation or None) datasets for a vision-language model's SFT."""
    processor = load_processor(cfg)
    if len(processor.tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"the processor's tokenizer has {len(processor.tokenizer)} tokens but "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    train_records, valid_records = sft.load_records(cfg)
    train = tokenize(train_records, processor, seq)
    valid = tokenize(valid_records, processor, seq) if valid_records else []
    sft.log_loaded(cfg, train, valid)

    def dataset(examples):
        return PaddedVisionSFTDataset(examples, seq, cfg.rng.seed, processor, cfg.model)

    return dataset(train), (dataset(valid) if valid else None)
