"""CLI: ``megabridge convert``, ``megabridge verify`` and ``megabridge models``."""

from __future__ import annotations

import json
import logging

import torch

from megabridge import command_paths
from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.verify import verify
from megabridge.errors import UserError
from megabridge.training import megatron_layout

log = logging.getLogger("megabridge.convert")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(text: str | None) -> torch.dtype | None:
    if text is None:
        return None
    if text not in DTYPES:
        raise UserError(f"--dtype {text!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[text]


def _check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value}: must be a positive integer")


def _set_layout(provider, args) -> None:
    _check_positive(args, "tp", "pp", "ep")
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    provider.expert_model_parallel_size = args.ep


def cmd_hf_to_megatron(args) -> int:
    out = command_paths.hf_to_megatron(args)
    bridge = AutoBridge.from_hf_pretrained(args.hf_path, text_only=args.text_only)
    if args.allow_non_finite:
        bridge.allow_non_finite_weights()
    provider = bridge.to_megatron_provider()
    _set_layout(provider, args)
    dtype = _dtype(args.dtype) or _source_dtype(bridge)
    provider.bf16 = dtype == torch.bfloat16
    bridge.save_megatron_checkpoint(out, provider, args.overwrite, progress=True)
    if args.megatron_layout and _is_rank0():
        megatron_layout.write(out, provider)
    log.info("wrote Megatron checkpoint %s (%s)", out, str(dtype).removeprefix("torch."))
    return 0


def _source_dtype(bridge) -> torch.dtype:
    dtypes = set((bridge.source_layout or {}).get("dtypes", {}).values())
    if dtypes == {"bfloat16"}:
        return torch.bfloat16
    if dtypes <= {"float32"}:
        return torch.float32
    raise UserError(
        f"the HF weights are {', '.join(sorted(dtypes))}: choose --dtype float32 or bfloat16"
    )


def cmd_megatron_to_hf(args) -> int:
    out = command_paths.megatron_to_hf(args)
    # the streamed export checks the checksums from the bytes it reads (no separate pass)
    bridge = AutoBridge.from_megatron_checkpoint(
        args.megatron_path, args.hf_config, check_content=False
    )
    if args.hf_reference:
        bridge.use_hf_reference(args.hf_reference)
    if args.allow_non_finite:
        bridge.allow_non_finite_weights()
    if (args.tp, args.pp, args.ep) == (1, 1, 1) and bridge.save_hf_from_checkpoint(
        out, _dtype(args.dtype), args.overwrite, progress=True
    ):
        log.info("wrote HF model %s (streamed)", out)
        return 0
    provider = bridge.to_megatron_provider()
    _set_layout(provider, args)
    model = bridge.to_megatron_model(provider)
    bridge.save_hf_pretrained(model, out, _dtype(args.dtype), args.overwrite, progress=True)
    log.info("wrote HF model %s", out)
    return 0


def cmd_verify(args) -> int:
    _check_positive(args, "tp", "pp", "ep", "batch", "seq_len")
    dtype = _dtype(args.dtype) or torch.float32
    result = verify(
        args.hf_path, args.megatron_path, args.tp, args.pp, args.ep, dtype,
        args.batch, args.seq_len, args.seed, args.atol, args.min_top1, args.image,
        args.text_only, videos=args.video, video_fps=args.video_fps,
    )  # fmt: skip
    verdict = "OK" if result.ok else "MISMATCH"
    log.info(
        "%s: max |logit diff| %.3g (atol %.3g), mean %.3g, top-1 agreement %.4f (min %.2f), "
        "%d tokens, %s",
        verdict, result.max_abs_diff, result.atol, result.mean_abs_diff,
        result.top1_agreement, result.min_top1, result.tokens, result.dtype,
    )  # fmt: skip
    if args.json and _is_rank0():
        print(json.dumps(result.to_dict()), flush=True)
    return 0 if result.ok else 1


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
