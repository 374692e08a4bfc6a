"""A vision-language model's inputs for images, made by its own HF image processor and
tokenizer (the files next to its config.json): pixel patches, their grid, and a prompt
that places the image's tokens between the vision start and end tokens, as the HF
processor does. LLaVA and Gemma 3 run their whole HF processor (processor_config.json) on
the prompt with its image marker. Used by verify (--image)."""

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
    # more inputs of transformers' forward from the processor (Gemma 3's token_type_ids)
    hf_extra: dict = field(default_factory=dict)


# Tower kind -> the processor attribute naming the text that marks where an image goes
# (the processor expands it into the image's tokens).
PROCESSOR_IMAGE_MARKER = {"llava": "image_token", "gemma3": "boi_token"}


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


def _read_image(path):
    from PIL import Image

    try:
        with Image.open(Path(path)) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {_first_line(e)}") from None


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
