"""A vision-language model's inputs for images, made by its own HF image processor and
tokenizer (the files next to its config.json): pixel patches, their grid, and a prompt
that places the image's tokens between the vision start and end tokens, as the HF
processor does. LLaVA and Gemma 3 run their whole HF processor (processor_config.json) on
the prompt with its image marker. Used by verify (--image).

A video (Qwen2.5-VL, Qwen3-VL; verify --video) is a clip of frame images, in order, given to the
model's whole HF processor as one video (``videos=[frames]``); video files are not decoded
here. Training reads its clips' frames with read_frames too (training/data/vision_sft.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megabridge.errors import UserError

if TYPE_CHECKING:
    import torch

PROMPT = " Describe this image."


@dataclass
class ImageSample:
    input_ids: torch.Tensor  # [1, s]
    pixel_values: torch.Tensor  # [patches, channels * temporal * patch * patch]
    image_grid_thw: torch.Tensor | None  # [1, 3] (Qwen2.5-VL); None: whole images
    # more inputs of transformers' forward from the processor (Gemma 3's token_type_ids,
    # Pixtral's image_sizes)
    hf_extra: dict = field(default_factory=dict)


# Tower kind -> the processor attribute naming the text that marks where an image goes
# (the processor expands it into the image's tokens).
PROCESSOR_IMAGE_MARKER = {
    "llava": "image_token", "gemma3": "boi_token", "mistral3": "image_token", "pixtral": "image_token",
}  # fmt: skip


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_processors(hf_path):
    """transformers' image processor and tokenizer of ``hf_path``."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        images = AutoImageProcessor.from_pretrained(str(hf_path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(hf_path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the files are missing or bad
        raise UserError(
            f"cannot load the image processor and tokenizer of {hf_path} "
            f"(preprocessor_config.json, tokenizer files): {_first_line(e)}"
        ) from None
    return images, tokenizer


def image_samples(hf_path, paths: list, vision: dict) -> list[ImageSample]:
    """One sample per image: [vision start] [image token] * n [vision end] PROMPT."""
    import torch

    if vision.get("kind") in PROCESSOR_IMAGE_MARKER:
        return processor_samples(hf_path, paths, vision)
    processor, tokenizer = load_processors(hf_path)
    merge = vision["spatial_merge_size"]
    text = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    samples = []
    for path in paths:
        pixels = processor(images=[_read_image(path)], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        tokens = int(grid.prod()) // merge**2
        ids = [vision["vision_start_token_id"], *[vision["image_token_id"]] * tokens,
               vision["vision_end_token_id"], *text]  # fmt: skip
        samples.append(ImageSample(torch.tensor([ids]), pixels["pixel_values"], grid))
    return samples


def _read_image(path, prefix: str = ""):
    from PIL import Image

    try:
        with Image.open(Path(path)) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{prefix}cannot read image {path}: {_first_line(e)}") from None


# ------------------------------------------------------------------ video (frames)

# What a clip's frames may be (a folder's other files are left out), and the video files we
# refuse by name rather than fail to read as images.
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
DEFAULT_FPS = 2.0  # the frame rate a list of frames is taken at, as qwen-vl-utils assumes


@dataclass
class VideoSample:
    input_ids: torch.Tensor  # [1, s]
    pixel_values_videos: torch.Tensor  # [patches, channels * temporal * patch * patch]
    video_grid_thw: torch.Tensor  # [1, 3]: temporal patches, rows, columns
    # [1]: seconds per temporal patch (Qwen2.5-VL's M-RoPE time steps); None: Qwen3-VL's
    # processor writes each temporal patch's time into the text instead
    second_per_grid_ts: torch.Tensor | None


def frame_paths(paths: list, where: str = "") -> list[Path]:
    """A clip's frames: the image files given, in order, or one folder's image files sorted by
    name. A video file is refused: it is not decoded here."""
    prefix = f"{where}: " if where else ""
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not paths:
            raise UserError(f"{prefix}{folder} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
    for p in paths:
        if p.suffix.lower() in VIDEO_SUFFIXES:
            raise UserError(
                f"{prefix}{p} is a video file, which megabridge does not decode: pass its frames "
                f"as image files (e.g. ffmpeg -i {p.name} -r 2 frames/%04d.png) or their folder"
            )
    return paths


def read_frames(paths: list[Path], min_frames: int, where: str = "") -> list:
    """A clip's frames as RGB images: at least ``min_frames`` (the tower's temporal_patch_size:
    fewer would be repeated into a still image), all of one size."""
    prefix = f"{where}: " if where else ""
    if len(paths) < min_frames:
        raise UserError(
            f"{prefix}a video of {len(paths)} frame(s): the model embeds frames in groups of "
            f"{min_frames}, so a video needs at least {min_frames} (pass one frame as an image)"
        )
    frames = [_read_image(p, prefix) for p in paths]
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        (w0, h0), (w1, h1) = sorted(sizes)[:2]
        raise UserError(
            f"{prefix}the frames of one video differ in size ({w0}x{h0} and {w1}x{h1} pixels, "
            f"{paths[0].parent}): resize them to one size"
        )
    return frames


def video_metadata(frames: list, fps: float) -> dict:
    """What the HF processor takes to place a clip's frames in time (second_per_grid_ts)."""
    return {"fps": fps, "total_num_frames": len(frames)}


def video_samples(hf_path, clips: list[list], vision: dict, fps: float = DEFAULT_FPS):
    """One sample per clip, from the model's HF processor (videos=[frames]):
    [vision start] [video token] * n [vision end] PROMPT."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(hf_path), local_files_only=True)
        video_token = processor.video_token
    except Exception as e:  # noqa: BLE001 - any failure means the files are missing or bad
        raise UserError(
            f"cannot load the video processor of {hf_path} (processor_config.json, "
            f"video_preprocessor_config.json, tokenizer files): {_first_line(e)}"
        ) from None
    if getattr(processor, "video_processor", None) is None:
        raise UserError(f"{hf_path}: its HF processor has no video processor")
    ends = processor.tokenizer.convert_ids_to_tokens(
        [vision["vision_start_token_id"], vision["vision_end_token_id"]]
    )
    text = ends[0] + video_token + ends[1] + PROMPT
    samples = []
    for clip in clips:
        frames = read_frames(frame_paths(clip), vision["temporal_patch_size"])
        out = processor(
            text=[text], videos=[frames], video_metadata=[video_metadata(frames, fps)],
            return_tensors="pt",
        )  # fmt: skip
        samples.append(VideoSample(out["input_ids"], out["pixel_values_videos"],
                                   out["video_grid_thw"], out.get("second_per_grid_ts")))  # fmt: skip
    return samples


def processor_samples(hf_path, paths: list, vision: dict) -> list[ImageSample]:
    """One sample per image, from the model's HF processor: [image marker] PROMPT."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(hf_path), local_files_only=True)
        marker = getattr(processor, PROCESSOR_IMAGE_MARKER[vision["kind"]])
    except Exception as e:  # noqa: BLE001 - any failure means the files are missing or bad
        raise UserError(
            f"cannot load the processor of {hf_path} (processor_config.json, "
            f"preprocessor_config.json, tokenizer files): {_first_line(e)}"
        ) from None
    samples = []
    for path in paths:
        out = processor(text=marker + PROMPT, images=[_read_image(path)], return_tensors="pt")
        extra = {
            k: v for k, v in out.items() if k not in ("input_ids", "pixel_values", "attention_mask")
        }
        samples.append(ImageSample(out["input_ids"], out["pixel_values"], None, extra))
    return samples
