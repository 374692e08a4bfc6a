"""The ``megabridge`` command.

    megabridge train    --recipe NAME [section.field=value ...]   train (pretrain, SFT, LoRA)
    megabridge finetune --recipe NAME --pretrained PATH [...]      SFT / LoRA of a pretrained model
    megabridge recipes                                             list recipes
    megabridge models                                              list supported HF families
    megabridge convert  hf-to-megatron | megatron-to-hf ...        convert checkpoints
    megabridge verify   --hf-path DIR [--megatron-path DIR]        compare logits with transformers
    megabridge data     preprocess ...                             JSONL -> Megatron .bin/.idx
    megabridge export   --megatron-path CKPT --hf-path | --adapter-path DIR   LoRA/DoRA -> HF / peft
    megabridge checkpoint verify PATH                              check sizes and checksums
    megabridge doctor   [--probe]                                  versions, GPUs, fast paths

A user mistake (bad path, option, override or checkpoint) prints one line and
exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

# Only light imports at module level: `megabridge --help`, `models`, `recipes`, `doctor`
# and argument errors answer without torch, Megatron-Core or transformers (seconds on a
# loaded machine). Each command imports what it needs when it runs (_command below).
from megabridge import catalog, command_paths
from megabridge.errors import UserError

# Megatron-Core announces at import every optional kernel it did not find. Without
# TE/Apex those are expected, and megabridge picks its own layer spec instead.
_EXPECTED_WARNINGS = (
    r".*Apex is not installed.*",
    r".*Transformer Engine and Apex are not installed.*",
    r".*tp_group is None, using default tp group.*",
    r".*MLP requires ffn_hidden_size.*",
    r".*full scope is deprecated.*",
    r".*dynamic_context.py.*",
    r".*custom_layers.transformer_engine.*",
    r".*No CUDA runtime is found.*",
    # Megatron-Core 0.16's own dist_checkpointing calls, deprecated by torch 2.6+.
    r".*`load_state_dict` is deprecated.*",
    r".*deprecating ShardedTensor.*",
)


def quiet_expected_warnings() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging() -> None:
    import torch  # noqa: F401  - torch configures its loggers on import; adjust them after

    rank = int(os.environ.get("RANK", 0))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("megatron", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # "No CUDA runtime is found": expected on a CPU machine that has a CUDA toolkit.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# ----------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    return _run_recipe(args, "train")


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.pretrained:
        args.overrides = [f"checkpoint.pretrained_checkpoint={args.pretrained}", *args.overrides]
    return _run_recipe(args, "finetune")


def _run_recipe(args: argparse.Namespace, entry: str) -> int:
    catalog.check_recipe(args.recipe)  # a misspelt name fails before the heavy imports
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides, check_pretrained, describe

    cfg = get_recipe(args.recipe)
    apply_overrides(cfg, args.overrides)  # a bad override fails before torch is imported
    if args.help_config:
        print(f"config keys of {args.recipe} (override with section.field=value):")
        print(describe(cfg))
        return 0
    if entry == "finetune":
        check_pretrained(cfg)
    setup_logging()
    from megabridge import runtime
    from megabridge.training import loop

    try:
        getattr(loop, entry)(cfg)
    finally:
        runtime.shutdown()
    return 0


# ------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megabridge",
        description="Hugging Face <-> Megatron-Core: convert, verify and train.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train from a recipe (pretrain, SFT, LoRA)",
        description="Train from a recipe. Launch several processes with "
        "`python -m torch.distributed.run --nproc_per_node=N -m megabridge train ...`.",
        epilog="examples:\n  megabridge train\n  megabridge train --recipe "
        "vanilla_gpt_pretrain_config train.train_iters=5 optimizer.lr=3e-4\n"
        "  megabridge train --recipe vanilla_gpt_pretrain_config --help-config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recipe",
        default=catalog.DEFAULT_RECIPE,
        help=f"recipe name (default: {catalog.DEFAULT_RECIPE})",
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="SFT or LoRA of a pretrained model (train that refuses random weights)",
        description="Fine-tune a pretrained model: an HF folder (converted on the fly) or a\n"
        "converted Megatron checkpoint. The model's shape is read from it; the recipe gives\n"
        "the rest (data, optimizer, LoRA settings). Several processes:\n"
        "  python -m torch.distributed.run --nproc_per_node=N -m megabridge finetune ...",
        epilog="examples:\n  megabridge finetune --recipe llama32_1b_finetune_config "
        "--pretrained hf/Llama-3.2-1B dataset.path=chat.jsonl\n  megabridge finetune --recipe "
        "qwen3_8b_lora_config --pretrained hf/Qwen3-8B dataset.path=sft_data/ peft.dim=32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", required=True, help="a *_finetune_config or *_lora_config recipe")
    p.add_argument(
        "--pretrained",
        metavar="PATH",
        help="HF folder or converted checkpoint (same as checkpoint.pretrained_checkpoint=PATH)",
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(func=catalog.cmd_recipes)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--help-config", action="store_true", help="list every config key with its value and help"
    )
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")


def _command(module: str, name: str, distributed: bool = True, check_paths=None):
    """The handler ``module.name``, imported when its command runs: the conversion, data
    and export modules load torch and megatron-core, which ``megabridge --help`` need not
    wait for. ``distributed``: the command may set up torch.distributed, torn down after it.
    ``check_paths(args)`` (command_paths) refuses unusable paths before that import."""

    def run(args: argparse.Namespace) -> int:
        if check_paths is not None:
            check_paths(args)
        setup_logging()
        from megabridge import runtime

        try:
            return getattr(importlib.import_module(module), name)(args)
        finally:
            if distributed:
                runtime.shutdown()

    return run


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")


def _conversion_output_args(p: argparse.ArgumentParser) -> None:
    """What both conversion directions take after their paths: dtype, overwrite, layout."""
    p.add_argument("--dtype", help="float32 or bfloat16 (default: the source's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="convert weights that hold NaN or Inf (refused by default)",
    )
    _layout_args(p)


def _text_only_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-only",
        action="store_true",
        help="read a vision-language checkpoint as its text-only language model where a text "
        "family can (Gemma3ForConditionalGeneration -> Gemma3ForCausalLM)",
    )


def _register_conversion(sub) -> None:
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
    _text_only_arg(c)
    c.add_argument(
        "--megatron-layout",
        action="store_true",
        help="make the output a save folder that Megatron-LM and Megatron-Bridge also load "
        "(iter_0000000/ with their args, run_config.yaml and train state; see the README)",
    )
    _conversion_output_args(c)
    c.set_defaults(
        func=_command(
            "megabridge.conversion.commands",
            "cmd_hf_to_megatron",
            check_paths=command_paths.hf_to_megatron,
        )
    )

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
    c.add_argument(
        "--hf-config",
        help="HF model folder or config.json describing a Megatron-LM / Megatron-Bridge / NeMo 2 "
        "checkpoint that carries no model description megabridge can read",
    )
    _conversion_output_args(c)
    c.set_defaults(
        func=_command(
            "megabridge.conversion.commands",
            "cmd_megatron_to_hf",
            check_paths=command_paths.megatron_to_hf,
        )
    )

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
    p.add_argument(
        "--image",
        action="append",
        metavar="PATH",
        help="an image to compare a vision-language model's logits on (repeatable; required "
        "for them, one sample per image, made by the model's own image processor)",
    )
    p.add_argument(
        "--video",
        action="append",
        nargs="+",
        metavar="FRAME",
        help="Qwen2.5-VL, Qwen3-VL: one video to compare on, as its frame images in order (or "
        "one folder of them, sorted by name); at least temporal_patch_size (2) frames of one size; "
        "repeatable, one sample per --video, made by the model's own HF processor. Video files "
        "(.mp4, ...) are not decoded: extract their frames first",
    )
    p.add_argument(
        "--video-fps",
        type=float,
        default=2.0,
        help="the frame rate of the --video frames (default 2.0): M-RoPE spaces frames in time "
        "(Qwen2.5-VL); the processor samples frames and writes their timestamps (Qwen3-VL)",
    )
    _text_only_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(
        func=_command(
            "megabridge.conversion.commands",
            "cmd_verify",
            check_paths=lambda args: command_paths.existing(args, "hf_path", "megatron_path"),
        )
    )

    p = sub.add_parser("models", help="list the supported HF model families")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (README)")
    p.set_defaults(func=catalog.cmd_models)


def _register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="LoRA/DoRA checkpoint -> merged HF model and/or peft adapter",
        description="Export a LoRA/DoRA training checkpoint.\n"
        "  --hf-path       the adapters merged into their base: a full HF model folder\n"
        "  --adapter-path  the adapters alone, as peft loads them:\n"
        "                  PeftModel.from_pretrained(base_model, PATH)\n"
        "Full-model checkpoints go through `megabridge convert megatron-to-hf`.",
        epilog="examples:\n  megabridge export --megatron-path runs/x/checkpoints --hf-path merged\n"
        "  megabridge export --megatron-path runs/x/checkpoints --adapter-path adapter\n"
        "  torchrun --nproc_per_node=2 -m megabridge export --megatron-path CKPT --hf-path OUT --tp 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--megatron-path", required=True, help="PEFT checkpoint folder (or a training save folder)"
    )
    p.add_argument("--hf-path", help="output: HF model folder with the adapters merged in")
    p.add_argument("--adapter-path", help="output: peft adapter folder (adapter_config.json + "
                   "adapter_model.safetensors)")  # fmt: skip
    p.add_argument(
        "--base", help="the pretrained model the adapters were trained on (default: as recorded)"
    )
    p.add_argument(
        "--hf-reference", help="HF folder whose config.json and tokenizer the merged model gets"
    )
    p.add_argument("--dtype", help="float32 or bfloat16 (default: the base's dtypes; adapter fp32)")
    p.add_argument(
        "--hf-config",
        help="HF model folder or config.json describing a base checkpoint from Megatron-LM, "
        "Megatron-Bridge or NeMo 2 that carries no model description (default: as recorded)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.set_defaults(
        func=_command("megabridge.peft.export", "cmd_export", check_paths=command_paths.export)
    )


def _register_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect Megatron checkpoints without loading them")
    ops = p.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    c = ops.add_parser(
        "verify",
        help="check every file of a checkpoint against its recorded sizes and checksums",
        description="Read every file of a megabridge checkpoint (or of each iter_* folder of a "
        "training save folder) and compare it with the sizes and checksums recorded when it was "
        "saved. Prints one line per problem; exit 0 when whole, 2 when damaged.",
    )
    c.add_argument("path", help="checkpoint folder or training save folder")
    c.set_defaults(
        func=_command("megabridge.training.integrity", "cmd_checkpoint_verify", distributed=False)
    )


def _register_data(sub) -> None:
    data = sub.add_parser("data", help="prepare training data (JSONL -> Megatron .bin/.idx)")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "preprocess",
        help="tokenize a JSONL corpus into a Megatron-Core indexed dataset",
        description="Tokenize one text field of every JSONL line into PREFIX.bin and "
        "PREFIX.idx, for dataset.type=indexed dataset.blend=PREFIX.",
        epilog="example:\n  megabridge data preprocess --input corpus.jsonl.gz "
        "--tokenizer hf_model/ --output-prefix data/corpus --workers 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="JSONL file, optionally .gz-compressed")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer (or model) folder")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--text-key", default="text", help="the JSON key holding the text (text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (1)")
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the tokenizer's EOS token (default: yes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.set_defaults(
        func=_command(
            "megabridge.training.data.preprocess",
            "cmd_preprocess",
            check_paths=lambda args: command_paths.existing(args, "input"),
        )
    )


def _register_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="versions, devices, fast paths, and whether this combination is a tested one",
        description="Report the installed versions (read from package metadata, nothing "
        "heavy imported), the GPUs nvidia-smi sees, which fast paths training will take, and "
        "whether these versions are a combination the project tests (README's compatibility "
        "table). --probe also imports torch to ask CUDA and NCCL themselves.",
    )
    p.add_argument("--probe", action="store_true", help="import torch: CUDA, NCCL, devices")
    p.add_argument(
        "--markdown", action="store_true", help="print the tested combinations (README table)"
    )
    p.set_defaults(func=_light_command("megabridge.doctor", "cmd_doctor"))


def _light_command(module: str, name: str):
    """A handler whose module is torch-free: imported when its command runs, no logging setup."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


_EXTRA_COMMANDS = [
    _register_conversion,
    _register_data,
    _register_export,
    _register_checkpoint,
    _register_doctor,
]


def main(argv: list[str] | None = None) -> int:
    quiet_expected_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            one_line = " ".join(str(e).split())  # a message that quotes a multi-line error
            print(f"megabridge: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megabridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
