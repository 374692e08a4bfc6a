"""CLI: ``megabridge convert``, ``megabridge verify`` and ``megabridge models``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from megabridge.errors import UserError

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


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists (pass --overwrite to replace it)")


def _set_layout(provider, args) -> None:
    provider.tensor_model_parallel_size = args.tp
    provider.pipeline_model_parallel_size = args.pp
    provider.expert_model_parallel_size = args.ep


def cmd_hf_to_megatron(args) -> int:
    from megabridge.conversion.auto_bridge import AutoBridge

    out = Path(args.megatron_path)
    _check_output(out, args.overwrite)
    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    provider = bridge.to_megatron_provider()
    _set_layout(provider, args)
    dtype = _dtype(args.dtype) or _source_dtype(bridge)
    provider.bf16 = dtype == torch.bfloat16
    bridge.save_megatron_checkpoint(out, provider, args.overwrite, progress=True)
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
    from megabridge.conversion.auto_bridge import AutoBridge

    out = Path(args.hf_path)
    _check_output(out, args.overwrite)
    bridge = AutoBridge.from_megatron_checkpoint(args.megatron_path)
    if args.hf_reference:
        bridge.use_hf_reference(args.hf_reference)
    provider = bridge.to_megatron_provider()
    _set_layout(provider, args)
    model = bridge.to_megatron_model(provider)
    bridge.save_hf_pretrained(model, out, _dtype(args.dtype), args.overwrite, progress=True)
    log.info("wrote HF model %s", out)
    return 0


def cmd_verify(args) -> int:
    from megabridge.conversion.verify import verify

    dtype = _dtype(args.dtype) or torch.float32
    result = verify(
        args.hf_path, args.megatron_path, args.tp, args.pp, args.ep, dtype,
        args.batch, args.seq_len, args.seed, args.atol, args.min_top1,
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


def cmd_models(args) -> int:
    from megabridge.conversion.auto_bridge import AutoBridge

    families = AutoBridge.list_supported()
    if args.markdown:
        print(markdown_table(families))
        return 0
    for f in families:
        print(
            f"{f['family']:12s} {', '.join(f['architectures']):45s} {'/'.join(f['parallelism']):10s} {f['notes']}"
        )
    return 0


def markdown_table(families: list[dict]) -> str:
    lines = ["| family | HF architectures | parallelism | notes |", "|---|---|---|---|"]
    for f in families:
        archs = ", ".join(f"`{a}`" for a in f["architectures"])
        lines.append(f"| {f['family']} | {archs} | {', '.join(f['parallelism'])} | {f['notes']} |")
    return "\n".join(lines)


def _with_runtime(fn):
    def run(args: argparse.Namespace) -> int:
        from megabridge import runtime

        try:
            return fn(args)
        finally:
            runtime.shutdown()

    return run


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert HF <-> Megatron checkpoints")
    conv = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

    c = conv.add_parser(
        "hf-to-megatron",
        help="HF folder -> Megatron distributed checkpoint",
        description="Write a Megatron-Core distributed checkpoint that training loads at any "
        "TP/PP (checkpoint.pretrained_checkpoint=DIR). In one process the tensors stream from the "
        "HF files into the checkpoint, one at a time, without building the model (memory stays "
        "far below the model's size); under torchrun each rank saves its shard of the model "
        "built at --tp/--pp/--ep.",
    )
    c.add_argument("--hf-path", required=True, help="HF model folder (config.json + safetensors)")
    c.add_argument("--megatron-path", required=True, help="output checkpoint folder")
    c.add_argument("--dtype", help="float32 or bfloat16 (default: the source's dtype)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _layout_args(c)
    c.set_defaults(func=_with_runtime(cmd_hf_to_megatron))

    c = conv.add_parser(
        "megatron-to-hf",
        help="Megatron checkpoint -> HF folder",
        description="Write an HF folder that transformers loads. Checkpoints converted from HF "
        "carry their config and tokenizer; otherwise pass --hf-reference.",
    )
    c.add_argument(
        "--megatron-path", required=True, help="checkpoint folder (or a training save folder)"
    )
    c.add_argument("--hf-path", required=True, help="output HF folder")
    c.add_argument(
        "--hf-reference", help="HF folder whose config.json, layout and tokenizer to use"
    )
    c.add_argument("--dtype", help="float32 or bfloat16 (default: the source's dtype)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _layout_args(c)
    c.set_defaults(func=_with_runtime(cmd_megatron_to_hf))

    p = sub.add_parser(
        "verify",
        help="compare Megatron logits with transformers'",
        description="Run transformers' model and the Megatron model (converted from --hf-path, or "
        "loaded from --megatron-path) on the same tokens. Exit 0 when they agree, 1 when not.",
    )
    p.add_argument("--hf-path", required=True, help="HF model folder (the reference)")
    p.add_argument(
        "--megatron-path", help="Megatron checkpoint to check (default: convert --hf-path)"
    )
    _layout_args(p)
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    p.add_argument(
        "--atol", type=float, help="max |logit diff| allowed (default 1e-3 fp32, 0.25 bf16)"
    )
    p.add_argument(
        "--min-top1", type=float, help="min top-1 agreement (default 0.99 fp32, 0.9 bf16)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=_with_runtime(cmd_verify))

    p = sub.add_parser("models", help="list the supported HF model families")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (README)")
    p.set_defaults(func=cmd_models)
