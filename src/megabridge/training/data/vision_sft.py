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

Qwen2.5-VL and Qwen3-VL also take videos, as their frames (the list-of-frames form
qwen-vl-utils documents; a string names a folder of frames; "fps", default 2, places them in
time)::

    {"type": "video", "video": ["clip/0001.png", "clip/0002.png", ...], "fps": 2}

A clip's frames are read in order, all of one size, at least the tower's
temporal_patch_size of them; the processor expands its one placeholder to the clip's video
tokens (Qwen3-VL's: each temporal patch's tokens after its timestamp, "<0.5 seconds>", the
video processor sampling the frames at its own fps from the clip's), and the M-RoPE
positions place its frames in time (models/vision.py video_position_args).

Examples are tokenized when the run starts (images are read then, to count their tokens);
their pixels are made again by the image processor when a batch needs them, so a large
dataset's pixels are never all in memory. Samples are padded, one example each; a
micro-batch concatenates its images' patches (``pixel_values``), has one
``image_grid_thw`` row per image, and M-RoPE positions per sample (Qwen2.5-VL, Qwen3-VL);
Gemma 3's and LLaVA's processors resize every image to one size, so ``pixel_values`` stacks
whole images and there is no grid. Pixtral's (Mistral 3) keeps each image's aspect: whole
images zero-padded to the micro-batch's largest, with each one's ``image_sizes`` row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megabridge.conversion import image_inputs
from megabridge.errors import ConfigError, UserError
from megabridge.models.vision import VIDEO_TOWERS, mrope_positions, video_position_args
from megabridge.training.data import sft
from megabridge.training.data.packing import PaddedSFTDataset
from megabridge.training.data.tokenizer import tokenizer_path

PART_TYPES = ("text", "image", "video")


@dataclass
class VisionExample(sft.Example):
    images: tuple[str, ...] = ()  # absolute paths, in the order of their placeholders
    grids: tuple[tuple[int, ...], ...] = ()  # the image processor's grid of each, at load
    videos: tuple[tuple[str, ...], ...] = ()  # each clip's frames (absolute paths), in order
    video_grids: tuple[tuple[int, ...], ...] = ()  # the video processor's grid of each clip
    video_fps: tuple[float, ...] = ()  # each clip's frame rate (the part's "fps")
    video_seconds: tuple[float, ...] = ()  # each clip's seconds per temporal patch (Qwen2.5-VL)


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


def parse_messages(
    record: dict, where: str, folder: Path, videos: bool = False
) -> tuple[list[dict], list[Path]]:
    """The messages (parts checked) and their images' paths, in order; video parts are refused
    unless the model takes ``videos`` (their clips: video_clips)."""
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
            if kind == "video" and not videos:
                raise UserError(
                    f"{where}: messages[{i}] has a video part; this model's training takes "
                    "images only (video frames: Qwen2.5-VL, Qwen3-VL)"
                )
            if kind == "image":
                images.append(_image_path(part, where, folder))
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to train on")
    return messages, images


def image_marker(processor) -> str:
    """The text that marks an image in the rendered chat, which the processor expands: Gemma
    3's begin-of-image token (older transformers name another token image_token), the
    others' image token."""
    return getattr(processor, "boi_token", None) or processor.image_token


def _expanded(offset: int, replacements: list[dict]) -> int:
    """A character offset of the rendered text, in the text with its placeholders expanded."""
    shift = 0
    for r in replacements:
        start, end = r["span"]
        if end <= offset:
            shift += (r["new_span"][1] - r["new_span"][0]) - (end - start)
    return offset + shift


@dataclass
class Clip:
    frames: list[Path]  # in order
    fps: float  # frames per second: where the frames are in time


def video_clips(messages: list[dict], where: str, folder: Path) -> list[Clip]:
    """The video parts' clips, in order (relative frame paths: from the JSONL file's folder)."""
    clips = []
    for i, m in enumerate(messages):
        for part in m["content"] if isinstance(m["content"], list) else []:
            if part["type"] != "video":
                continue
            value = part.get("video")
            if isinstance(value, str):
                value = [value]  # a folder of frames (a video file is refused by frame_paths)
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise UserError(f"{where}: messages[{i}]: a video part needs 'video': frame paths")
            fps = part.get("fps", part.get("sample_fps", image_inputs.DEFAULT_FPS))
            if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
                raise UserError(
                    f"{where}: messages[{i}]: a video's 'fps' must be a positive number"
                )
            paths = [Path(v.removeprefix("file://")) for v in value]
            paths = [p if p.is_absolute() else folder / p for p in paths]
            clips.append(Clip(image_inputs.frame_paths(paths, where), float(fps)))
    return clips


def _video_inputs(processor, clips: list[Clip], where: str) -> dict:
    """The processor's video arguments for ``clips``: their frames (checked) and frame rates."""
    if not clips:
        return {}
    patch = processor.video_processor.temporal_patch_size
    frames = [image_inputs.read_frames(c.frames, patch, where) for c in clips]
    metadata = [image_inputs.video_metadata(f, c.fps) for f, c in zip(frames, clips, strict=True)]
    return {"videos": frames, "video_metadata": metadata}


def render(
    processor, record: dict, where: str, folder: Path, videos: bool = False
) -> VisionExample:
    """One JSONL record -> a VisionExample (ids with expanded image and video tokens, answer
    mask); ``videos``: the model takes video parts (models/vision.py VIDEO_TOWERS)."""
    messages, paths = parse_messages(record, where, folder, videos)
    clips = video_clips(messages, where, folder) if videos else []
    if clips and getattr(processor, "video_processor", None) is None:
        raise UserError(
            f"{where}: a video part, but the model's HF processor has no video processor"
        )
    full, spans = sft.assistant_spans(processor, messages, where)
    if clips and full.count(processor.video_token) != len(clips):
        raise UserError(
            f"{where}: the rendered conversation has {full.count(processor.video_token)} video "
            f"placeholders ({processor.video_token}) but {len(clips)} video parts"
        )
    marker = image_marker(processor)
    placeholders = full.count(marker)
    if placeholders != len(paths):
        raise UserError(
            f"{where}: the rendered conversation has {placeholders} image placeholders "
            f"({marker}) but {len(paths)} image parts"
        )
    images = [_read_image(p, where) for p in paths]
    reports = reports_expansion(processor)
    extra = dict(return_offsets_mapping=True, return_text_replacement_offsets=True)
    try:
        out = processor(
            text=[full], images=images or None, **_video_inputs(processor, clips, where),
            **(extra if reports else {}),
        )  # fmt: skip
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
    grids = _grids(out) if images else ()
    example = VisionExample(
        np.asarray(out["input_ids"][0], dtype=np.int64), np.asarray(answer, dtype=bool), where,
        tuple(str(p) for p in paths), grids,
    )  # fmt: skip
    if clips:
        example.videos = tuple(tuple(str(p) for p in c.frames) for c in clips)
        example.video_grids = tuple(tuple(g) for g in out["video_grid_thw"].tolist())
        example.video_fps = tuple(c.fps for c in clips)
        if "second_per_grid_ts" in out:  # Qwen2.5-VL's; Qwen3-VL's times are in the text
            example.video_seconds = tuple(float(x) for x in out["second_per_grid_ts"])
    return example


def _grids(processed) -> tuple[tuple[int, ...], ...]:
    """Each image's patch grid (Qwen's image_grid_thw), its size (Pixtral's image_sizes), or
    its pixel shape for a processor that resizes every image to one size (Gemma 3, LLaVA):
    what must not change later."""
    for key in ("image_grid_thw", "image_sizes"):
        if key in processed:
            return tuple(tuple(g) for g in processed[key].tolist())
    return tuple(tuple(p.shape) for p in processed["pixel_values"])


def reports_expansion(processor) -> bool:
    """Whether the processor says where each placeholder went (transformers 5.10 and later)."""
    return hasattr(processor, "get_text_with_replacements")


def _aligned_answers(processor, full: str, spans, expanded: list[int], where: str) -> list[bool]:
    """The answer mask of the expanded ids, for a processor that does not report its
    expansion: the text tokenized as rendered (one token per placeholder), then walked along
    the expanded ids, each placeholder standing for its run of image tokens."""
    tokenizer = processor.tokenizer
    markers = (processor.image_token, getattr(processor, "video_token", None))
    placeholder_ids = {tokenizer.convert_tokens_to_ids(t) for t in markers if t}
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    answer, j = [], 0
    for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if token in placeholder_ids:
            run = j
            while run < len(expanded) and expanded[run] == token:
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


def tokenize(records, processor, seq_length: int, videos: bool = False) -> list[VisionExample]:
    """sft.tokenize with the processor: image paths are relative to each record's file;
    ``videos``: the model takes video parts."""
    rendered = [
        (where, render(processor, record, where, Path(where.rpartition(":")[0]).parent, videos))
        for where, record in records
    ]
    return sft.keep_fitting(rendered, len(records), seq_length)


class PaddedVisionSFTDataset(PaddedSFTDataset):
    """Padded samples with their images' pixels; ``collate`` adds M-RoPE positions."""

    def __init__(self, examples, seq_length: int, seed: int, processor, model_cfg):
        super().__init__(examples, seq_length, seed)
        self.image_processor = processor.image_processor
        self.image_kwargs = _image_kwargs(processor)
        self.video_processor = getattr(processor, "video_processor", None)
        self.vision = model_cfg.vision
        self.mrope = model_cfg.position_embedding_type == "mrope"

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        example = self.examples[self.order[index]]
        if example.images:
            images = [_read_image(Path(p), example.where) for p in example.images]
            pixels = self.image_processor(images=images, return_tensors="pt", **self.image_kwargs)
            if _grids(pixels) != example.grids:
                raise UserError(f"{example.where}: an image changed since the run started")
            sample["pixel_values"] = pixels["pixel_values"]
            for key in ("image_grid_thw", "image_sizes"):  # Qwen's patch grids, Pixtral's sizes
                if key in pixels:
                    sample[key] = pixels[key]
        if example.videos:
            sample.update(self._video_pixels(example))
        return sample

    def _video_pixels(self, example: VisionExample) -> dict:
        """A sample's clips, made again by the video processor as at load."""
        patch = self.video_processor.temporal_patch_size
        frames = [image_inputs.read_frames([Path(p) for p in c], patch, example.where)
                  for c in example.videos]  # fmt: skip
        metadata = [image_inputs.video_metadata(f, fps)
                    for f, fps in zip(frames, example.video_fps, strict=True)]  # fmt: skip
        # the same metadata as at load: Qwen3-VL's video processor samples frames by it
        pixels = self.video_processor(videos=frames, video_metadata=metadata, return_tensors="pt")
        grid = pixels["video_grid_thw"]
        if tuple(tuple(g) for g in grid.tolist()) != example.video_grids:
            raise UserError(f"{example.where}: a video's frames changed since the run started")
        seconds = torch.tensor(example.video_seconds, dtype=torch.float32)  # [] for Qwen3-VL
        return {"pixel_values_videos": pixels["pixel_values_videos"], "video_grid_thw": grid,
                "second_per_grid_ts": seconds}  # fmt: skip

    def collate(self, samples: list[dict]) -> dict:
        """Stacked tokens; the images' patches and grids concatenated; positions [3, b, s]."""
        batch = {
            k: torch.stack([s[k] for s in samples])
            for k in ("tokens", "labels", "loss_mask", "position_ids")
        }
        with_images = [s for s in samples if "pixel_values" in s]
        grid = None
        if with_images:
            batch["pixel_values"] = _padded_cat([s["pixel_values"] for s in with_images])
            if "image_grid_thw" in with_images[0]:
                grid = torch.cat([s["image_grid_thw"] for s in with_images])
                batch["image_grid_thw"] = grid
            if "image_sizes" in with_images[0]:
                batch["image_sizes"] = torch.cat([s["image_sizes"] for s in with_images])
        batch.update(_collate_videos(samples))
        if self.mrope:  # positions follow the image and video grids (models/vision.py)
            batch["position_ids"] = mrope_positions(
                batch["tokens"], grid, self.vision["image_token_id"],
                self.vision["spatial_merge_size"], **self._video_positions(batch),
            )  # fmt: skip
        return batch

    def _video_positions(self, batch: dict) -> dict:
        """mrope_positions' video arguments for a collated batch ({} without videos)."""
        if "video_grid_thw" not in batch:
            return {}
        return video_position_args(
            self.vision, batch["video_grid_thw"], batch["second_per_grid_ts"]
        )


def _image_kwargs(processor) -> dict:
    """What the whole processor passes its image processor besides the images: Pixtral's
    sizes images in multiples of patch x spatial merge (PixtralProcessor._process_images),
    not in the image processor's own patch_size."""
    merge, patch = (
        getattr(processor, "spatial_merge_size", None),
        getattr(processor, "patch_size", None),
    )
    if isinstance(merge, int) and isinstance(patch, int):
        return {"patch_size": {"height": patch * merge, "width": patch * merge}}
    return {}


def _padded_cat(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Whole images [n, c, h, w] of several samples in one tensor, zero-padded at the bottom
    and right to the largest (Pixtral: each image's own size is in image_sizes); Qwen's
    patches [patches, d] concatenated."""
    if pixels[0].dim() != 4:
        return torch.cat(pixels)
    h, w = max(p.shape[2] for p in pixels), max(p.shape[3] for p in pixels)
    return torch.cat([F.pad(p, [0, w - p.shape[3], 0, h - p.shape[2]]) for p in pixels])


def _collate_videos(samples: list[dict]) -> dict:
    """The samples' clips: patches, grids and seconds per temporal patch, concatenated."""
    with_videos = [s for s in samples if "pixel_values_videos" in s]
    keys = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: torch.cat([s[k] for s in with_videos]) for k in keys} if with_videos else {}


def build(cfg, seq: int):
    """(train, validation or None) datasets for a vision-language model's SFT."""
    processor = load_processor(cfg)
    if len(processor.tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"the processor's tokenizer has {len(processor.tokenizer)} tokens but "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    train_records, valid_records = sft.load_records(cfg)
    videos = cfg.model.vision["kind"] in VIDEO_TOWERS
    train = tokenize(train_records, processor, seq, videos)
    valid = tokenize(valid_records, processor, seq, videos) if valid_records else []
    sft.log_loaded(cfg, train, valid)

    def dataset(examples):
        return PaddedVisionSFTDataset(examples, seq, cfg.rng.seed, processor, cfg.model)

    return dataset(train), (dataset(valid) if valid else None)
