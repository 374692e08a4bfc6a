"""Megatron-Core optimizer, LR schedule and DDP wrapping from our config."""

from __future__ import annotations

import math

import torch

from megabridge.models.provider import use_bf16
from megabridge.training.config import ConfigContainer


def wrap_ddp(cfg: ConfigContainer, model_chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.dist.overlap_grad_reduce,
        overlap_param_gather=cfg.dist.overlap_param_gather,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        average_in_collective=False,  # per-token loss: finalize_model_grads divides by tokens
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Bucketing is off for all but the first chunk, as Megatron-LM does.
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def build_optimizer(cfg: ConfigContainer, model_chunks: list[torch.nn.Module]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer=o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=use_bf16(cfg.model),
        params_dtype=torch.bfloat16 if use_bf16(cfg.model) else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    _use_fused_adam(optimizer)
    return optimizer


def _use_fused_adam(optimizer) -> None:
    """Without TE/Apex, Megatron-Core falls back to torch.optim.AdamW with its default
    multi-kernel (foreach) path; on GPU switch its param groups to torch's fused kernel."""
    if not torch.cuda.is_available():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def build_scheduler(cfg: ConfigContainer, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = cfg.train.global_batch_size
    decay_iters = cfg.scheduler.lr_decay_iters or cfg.train.train_iters
    warmup = min(cfg.scheduler.lr_warmup_iters, decay_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.scheduler.lr_warmup_init,
        max_lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        # Counted in samples, as Megatron-LM does: step(increment=global_batch_size).
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=max(decay_iters * gbs, warmup * gbs + 1),
        lr_decay_style=cfg.scheduler.lr_decay_style,
        start_wd=cfg.optimizer.weight_decay,
        end_wd=cfg.optimizer.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, decay_iters // 10) * gbs,
        lr_wsd_decay_style="linear",
    )


def grad_norm_before_step(optimizer) -> float:
    """The global gradient norm (NaN where a loss scaler found inf), gradients made ready.

    A collective: every rank takes the same step-or-skip decision from it. Reading it is
    the step's one wait for the GPU.
    """
    if optimizer.prepare_grads():  # a loss scaler found inf
        return float("nan")
    return float(optimizer.get_grad_norm())


def step_if_finite(optimizer, grad_norm: float) -> bool:
    """Clip to the norm and step, unless the norm is not finite.

    Megatron-Core's optimizer.step() applies a NaN/Inf gradient to the weights
    when there is no loss scaler (bf16 / fp32): the update is skipped here instead.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if not math.isfinite(grad_norm):
        return False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, grad_norm)
    return bool(optimizer.step_with_ready_grads())


def connect_to_schedules(cfg: ConfigContainer, model_chunks, optimizer) -> None:
    """Tell Megatron-Core's pipeline schedules how to sync, finalize and scale grads."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    # All-reduce over DP, tied embeddings over PP, then divide by the token count.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.dist.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in model_chunks]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if cfg.dist.overlap_param_gather and cfg.optimizer.use_distributed_optimizer:
        param_sync = [m.start_param_sync for m in model_chunks]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync
