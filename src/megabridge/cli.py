"""The ``megabridge`` command.

    megabridge train    --recipe NAME [section.field=value ...]   train (pretrain, SFT, LoRA)
    megabridge finetune --recipe NAME --pretrained PATH [...]      SFT / LoRA of a pretrained model
    megabridge recipes                                             list recipes
    megabridge models                                              list supported HF families
    megabridge convert  hf-to-megatron | megatron-to-hf ...        convert checkpoints
    megabridge verify   --hf-path DIR [--megatron-path DIR]        compare logits with transformers
    megabridge data     preprocess ...                             JSONL -> Megatron .bin/.idx
    megabridge export   --megatron-path CKPT --hf-path | --adapter-path DIR   LoRA/DoRA -> HF / peft

A user mistake (bad path, option, override or checkpoint) prints one line and
exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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
    from megabridge.training import loop

    return _run_recipe(args, loop.train)


def cmd_finetune(args: argparse.Namespace) -> int:
    from megabridge.training import loop

    if args.pretrained:
        args.overrides = [f"checkpoint.pretrained_checkpoint={args.pretrained}", *args.overrides]
    return _run_recipe(args, loop.finetune)


def _run_recipe(args: argparse.Namespace, run) -> int:
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides, describe

    cfg = get_recipe(args.recipe)
    apply_overrides(cfg, args.overrides)
    if args.help_config:
        print(f"config keys of {args.recipe} (override with section.field=value):")
        print(describe(cfg))
        return 0
    from megabridge import runtime

    try:
        run(cfg)
    finally:
        runtime.shutdown()
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from megabridge.recipes import all_recipes, describe_recipe

    for name in all_recipes():
        print(f"{name:40s} {describe_recipe(name)}")
    return 0


# ------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from megabridge.recipes import DEFAULT_RECIPE

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
        "--recipe", default=DEFAULT_RECIPE, help=f"recipe name (default: {DEFAULT_RECIPE})"
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
    p.set_defaults(func=cmd_recipes)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--help-config", action="store_true", help="list every config key with its value and help"
    )
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")


def _register_conversion(sub) -> None:
    from megabridge.conversion import commands

    commands.register(sub)


def _register_data(sub) -> None:
    from megabridge.training.data.preprocess import add_command

    add_command(sub)


def _register_export(sub) -> None:
    from megabridge.peft import export

    export.register(sub)


_EXTRA_COMMANDS = [_register_conversion, _register_data, _register_export]


def main(argv: list[str] | None = None) -> int:
    quiet_expected_warnings()
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"megabridge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megabridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
