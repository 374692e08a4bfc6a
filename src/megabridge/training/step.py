"""One training or evaluation step through Megatron-Core's pipeline schedules."""

from __future__ import annotations

import math
import os
from functools import partial

import torch
import torch.distributed as dist

from megabridge.training.data.batching import collate, micro_batches
from megabridge.training.optim import (
    decides_on_device,
    grad_norm_before_step,
    step_deciding_on_device,
    step_if_finite,
)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss: (sum over tokens, token count, report) for Megatron's schedules."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


# A vision-language model's inputs besides the tokens (training/data/vision_sft.py); every
# stage gets them, and only the first one (which holds the tower) reads them.
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes")  # image_sizes: Pixtral's
VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")  # Qwen2.5-VL's clips, the same way


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,  # causal masking happens inside attention; no s x s mask is built here
        labels=batch["labels"],
        packed_seq_params=batch.get("packed_seq_params"),
        **{k: batch[k] for k in IMAGE_INPUTS + VIDEO_INPUTS if k in batch},
    )
    return output, partial(loss_func, batch["loss_mask"])


def _loss_total(losses_reduced: list[dict], device) -> torch.Tensor:
    """[loss sum, tokens] over the global batch on every rank, on the device (no host wait)."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses_reduced:  # non-empty only on the last pipeline stage
        total += item["lm loss"].to(device=device, dtype=torch.float64)
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        total.zero_()  # count each micro-batch once: last stage, TP rank 0
    dist.all_reduce(total)
    return total


def _mean_loss(total: torch.Tensor) -> tuple[float, float]:
    loss_sum, tokens = total.tolist()
    return _per_token(loss_sum, tokens), tokens


def _per_token(loss_sum: float, tokens: float) -> float:
    return loss_sum / tokens if tokens else float("nan")


def run_microbatches(
    cfg, model_chunks, dataset, consumed: int, forward_only: bool, step_func=forward_step
):
    """Forward (and backward) one global batch; returns (loss, tokens)."""
    total = _forward_backward(cfg, model_chunks, dataset, consumed, forward_only, step_func)
    return _mean_loss(total)


def _forward_backward(cfg, model_chunks, dataset, consumed: int, forward_only: bool, step_func):
    """Forward (and backward) one global batch; returns [loss sum, tokens] on the device."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = cfg.train
    dp_size = ps.get_data_parallel_world_size()
    num_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
    device = next(model_chunks[0].parameters()).device
    data = micro_batches(
        dataset,
        consumed,
        t.global_batch_size,
        t.micro_batch_size,
        ps.get_data_parallel_rank(),
        dp_size,
        device,
        collate_fn=getattr(dataset, "collate", collate),
    )
    seq_length = cfg.dataset.seq_length or cfg.model.seq_length
    losses = get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=data,
        model=model_chunks,
        num_microbatches=num_micro,
        seq_length=seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=forward_only,
    )
    return _loss_total(losses, device)


def train_step(cfg, model_chunks, optimizer, scheduler, dataset, consumed: int):
    """One optimizer step. Returns (loss, grad_norm, stepped, tokens)."""
    step_func = _inject_faults(consumed // cfg.train.global_batch_size + 1)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    total = _forward_backward(cfg, model_chunks, dataset, consumed, False, step_func)
    if decides_on_device(optimizer):  # fused AdamW: no wait for the GPU before the step
        loss_sum, tokens, grad_norm, stepped = step_deciding_on_device(optimizer, total)
        loss = _per_token(loss_sum, tokens)
        if not math.isfinite(loss):
            grad_norm = float("nan")
    else:
        # One wait for the GPU per step, on the gradient norm; the loss is read after it
        # (done by then). Reading the loss first left the GPU idle while the host launched
        # the gradient copies and the norm kernels (host gaps in the 2026-11 profile).
        grad_norm = grad_norm_before_step(optimizer)
        loss, tokens = _mean_loss(total)
        if not math.isfinite(loss):
            return loss, float("nan"), False, tokens
        stepped = step_if_finite(optimizer, grad_norm)
    if stepped:
        scheduler.step(increment=cfg.train.global_batch_size)
    return loss, grad_norm, stepped, tokens


@torch.no_grad()
def evaluate(cfg, model_chunks, dataset) -> float:
    for chunk in model_chunks:
        chunk.eval()
    total, tokens = 0.0, 0.0
    for i in range(cfg.train.eval_iters):
        loss, n = run_microbatches(
            cfg, model_chunks, dataset, i * cfg.train.global_batch_size, forward_only=True
        )
        total += loss * n
        tokens += n
    for chunk in model_chunks:
        chunk.train()
    return total / tokens if tokens else float("nan")


# ------------------------------------------------------------------ fault injection
# Test hooks, read here and nowhere else (tests/functional_tests/test_resilience.py).
# They make happen on demand what a diverging run or a dying node does:
#   MEGABRIDGE_INJECT_NAN_AT=3,4    iterations 3 and 4 get a NaN loss (and NaN gradients)
#   MEGABRIDGE_INJECT_EXIT_AT=1:3   rank 1 dies, os._exit(13), as iteration 3 begins
INJECT_NAN_AT = "MEGABRIDGE_INJECT_NAN_AT"
INJECT_EXIT_AT = "MEGABRIDGE_INJECT_EXIT_AT"
INJECTED_EXIT_CODE = 13


def _inject_faults(iteration: int):
    """The forward step for ``iteration``: forward_step, unless a test asked for a fault."""
    if os.environ.get(INJECT_EXIT_AT) == f"{dist.get_rank()}:{iteration}":
        message = f"rank {dist.get_rank()}: {INJECT_EXIT_AT}: dying at iteration {iteration}\n"
        os.write(2, message.encode())
        os._exit(INJECTED_EXIT_CODE)
    if str(iteration) in os.environ.get(INJECT_NAN_AT, "").split(","):
        return _nan_forward_step
    return forward_step


def _nan_forward_step(data_iterator, model):
    output, loss_func = forward_step(data_iterator, model)
    return output * float("nan"), loss_func
