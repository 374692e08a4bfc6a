"""Run transformers' model and the Megatron model on the same tokens; compare logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megabridge.conversion import image_inputs
from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.errors import UserError
from megabridge.models.vision import VIDEO_TOWERS, mrope_positions, video_position_args

DEFAULT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25}
DEFAULT_MIN_TOP1 = {torch.float32: 0.99, torch.bfloat16: 0.9}


@dataclass
class VerifyResult:
    ok: bool
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float
    min_top1: float
    tokens: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def sample_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


def _hf_model(hf_path, dtype: torch.dtype, device, vision: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(hf_path), dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' own loading errors
        raise UserError(f"transformers cannot load {hf_path}: {e}") from None
    return model.to(device).eval()


@torch.no_grad()
def hf_logits(hf_path, tokens: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    model = _hf_model(hf_path, dtype, device)
    logits = model(input_ids=tokens.to(device)).logits.float()
    del model
    return logits


@torch.no_grad()
def hf_image_logits(
    hf_path, samples, vision: dict, dtype: torch.dtype, device, clips=()
) -> torch.Tensor:
    """transformers' logits [1, sum of lengths, vocab] of image samples, one after another,
    then of video samples (``clips``: image_inputs.VideoSample)."""
    model = _hf_model(hf_path, dtype, device, vision=True)
    out = []
    for sample in samples:
        ids = sample.input_ids.to(device)
        extra = {k: v.to(device) for k, v in sample.hf_extra.items()}
        if sample.image_grid_thw is not None:
            # image tokens are of type 1: transformers then computes its own M-RoPE positions
            extra["mm_token_type_ids"] = (ids == vision["image_token_id"]).int()
            extra["image_grid_thw"] = sample.image_grid_thw.to(device)
        pixels = sample.pixel_values.to(device, dtype)
        out.append(model(input_ids=ids, pixel_values=pixels, **extra).logits.float())
    for clip in clips:
        ids = clip.input_ids.to(device)
        seconds = clip.second_per_grid_ts  # Qwen2.5-VL's; Qwen3-VL's times are in the text
        seconds = {} if seconds is None else {"second_per_grid_ts": seconds.to(device)}
        out.append(model(
            input_ids=ids, pixel_values_videos=clip.pixel_values_videos.to(device, dtype),
            video_grid_thw=clip.video_grid_thw.to(device), **seconds,
            mm_token_type_ids=2 * (ids == vision["video_token_id"]).int(),  # 2: video tokens
        ).logits.float())  # fmt: skip
    del model
    return torch.cat(out, dim=1)


def megatron_image_logits(chunks, samples, vision: dict) -> torch.Tensor | None:
    """megatron_logits of image samples, one after another (like hf_image_logits)."""
    out = []
    for sample in samples:
        images, positions = {"pixel_values": sample.pixel_values}, None
        if "image_sizes" in sample.hf_extra:  # Pixtral: each image at its own size
            images["image_sizes"] = sample.hf_extra["image_sizes"]
        if sample.image_grid_thw is not None:  # Qwen2.5-VL: M-RoPE over the image grid
            positions = mrope_positions(
                sample.input_ids, sample.image_grid_thw, vision["image_token_id"],
                vision["spatial_merge_size"],
            )  # fmt: skip
            images["image_grid_thw"] = sample.image_grid_thw
        out.append(megatron_logits(chunks, sample.input_ids, positions, images))
    return None if out[0] is None else torch.cat(out, dim=1)


def megatron_video_logits(chunks, clips, vision: dict) -> torch.Tensor | None:
    """megatron_logits of video samples, one after another (like hf_image_logits' clips)."""
    out = []
    for clip in clips:
        positions = mrope_positions(
            clip.input_ids, None, vision["image_token_id"], vision["spatial_merge_size"],
            **video_position_args(vision, clip.video_grid_thw, clip.second_per_grid_ts),
        )  # fmt: skip
        videos = {"pixel_values_videos": clip.pixel_values_videos,
                  "video_grid_thw": clip.video_grid_thw}  # fmt: skip
        out.append(megatron_logits(chunks, clip.input_ids, positions, videos))
    return None if out[0] is None else torch.cat(out, dim=1)


@torch.no_grad()
def megatron_logits(
    chunks, tokens: torch.Tensor, positions: torch.Tensor | None = None, extra: dict | None = None
) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage; None elsewhere.

    ``positions`` default to 0..s-1 per sequence; ``extra`` are more model inputs
    (a vision-language model's images)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    positions = positions.to(device)
    extra = {k: v.to(device) for k, v in (extra or {}).items()}

    def collect(output, non_loss_data=False):
        return tensor_parallel.gather_from_tensor_model_parallel_region(output).float()

    def forward_step(data_iterator, model):
        next(data_iterator)
        return model(tokens, positions, None, **extra), collect

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=chunks,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    return out[0] if ps.is_pipeline_last_stage() else None


def compare(
    reference: torch.Tensor,
    logits: torch.Tensor,
    vocab_size: int,
    dtype: torch.dtype,
    atol: float | None,
    min_top1: float | None,
) -> VerifyResult:
    logits = logits[..., :vocab_size].to(reference.device)
    diff = (logits - reference).abs()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    atol = DEFAULT_ATOL.get(dtype, 0.25) if atol is None else atol
    min_top1 = DEFAULT_MIN_TOP1.get(dtype, 0.9) if min_top1 is None else min_top1
    max_diff = diff.max().item()
    return VerifyResult(
        ok=bool(max_diff <= atol and top1 >= min_top1),
        max_abs_diff=max_diff,
        mean_abs_diff=diff.mean().item(),
        top1_agreement=top1,
        atol=atol,
        min_top1=min_top1,
        tokens=reference.shape[0] * reference.shape[1],
        dtype=str(dtype).removeprefix("torch."),
    )


def _megatron_bridge(megatron_path, hf_path) -> AutoBridge:
    """The checkpoint's bridge; one that carries no model description (a foreign checkpoint)
    is described by the HF model it is compared with."""
    try:
        return AutoBridge.from_megatron_checkpoint(megatron_path)
    except UserError as e:
        if "--hf-config" not in str(e):
            raise
        return AutoBridge.from_megatron_checkpoint(megatron_path, hf_config=hf_path)


def verify(
    hf_path,
    megatron_path=None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: torch.dtype = torch.float32,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    atol: float | None = None,
    min_top1: float | None = None,
    images: list | None = None,
    text_only: bool = False,
    videos: list | None = None,
    video_fps: float = image_inputs.DEFAULT_FPS,
) -> VerifyResult:
    """Build the Megatron model (from ``hf_path`` or ``megatron_path``) and compare; every rank
    returns the result. A vision-language model is compared on ``images`` (one sample each)
    and ``videos`` (lists of frame paths, or of one folder of frames: one sample each, taken
    at ``video_fps`` frames per second); ``text_only``: its language model alone, where a
    text family reads it (Gemma 3)."""
    hf_bridge = AutoBridge.from_hf_pretrained(hf_path, text_only=text_only)
    vision = hf_bridge.model_config.vision
    _check_visual_inputs(hf_bridge, images, videos)
    if videos and not video_fps > 0:
        raise UserError(f"--video-fps must be positive, got {video_fps}")
    samples = image_inputs.image_samples(hf_path, images, vision) if images else None
    clips = image_inputs.video_samples(hf_path, videos, vision, video_fps) if videos else None
    bridge = _megatron_bridge(megatron_path, hf_path) if megatron_path else hf_bridge
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.expert_model_parallel_size = ep
    provider.bf16 = dtype == torch.bfloat16
    if hf_bridge.model_config.vocab_size != provider.vocab_size:
        raise UserError(
            f"the Megatron checkpoint has vocab_size {provider.vocab_size}, "
            f"the HF model {hf_bridge.model_config.vocab_size}"
        )
    seq_len = min(seq_len, provider.seq_length)
    tokens = sample_tokens(provider.vocab_size, batch, seq_len, seed)
    model = bridge.to_megatron_model(provider)
    if samples or clips:
        parts = [megatron_image_logits(model, samples, vision)] if samples else []
        parts += [megatron_video_logits(model, clips, vision)] if clips else []
        logits = None if parts[0] is None else torch.cat(parts, dim=1)
    else:
        logits = megatron_logits(model, tokens)
    result = None
    if logits is not None and (samples or clips):
        reference = hf_image_logits(
            hf_path, samples or [], vision, dtype, logits.device, clips=clips or []
        )
        result = compare(reference, logits, provider.vocab_size, dtype, atol, min_top1)
    elif logits is not None:
        reference = hf_logits(hf_path, tokens, dtype, logits.device)
        result = compare(reference, logits, provider.vocab_size, dtype, atol, min_top1)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    return next(r for r in everyone if r is not None)


def _check_visual_inputs(hf_bridge: AutoBridge, images, videos) -> None:
    """A vision-language model needs images or videos to compare on; a text model takes none;
    videos only where the model embeds them (models/vision.py VIDEO_TOWERS)."""
    name, vision = hf_bridge.family.display_name(), hf_bridge.model_config.vision
    if vision is not None and not images and not videos:
        raise UserError(
            f"verify of the vision-language {name} compares logits on images: pass --image PATH "
            "(one or more), or for Qwen2.5-VL and Qwen3-VL --video FRAME [FRAME ...]"
        )
    if vision is None and (images or videos):
        flag = "--image" if images else "--video"
        raise UserError(f"{flag}: {name} is a text-only model")
    if videos and vision["kind"] not in VIDEO_TOWERS:
        raise UserError(f"--video: {name} takes images only here (video: Qwen2.5-VL, Qwen3-VL)")
