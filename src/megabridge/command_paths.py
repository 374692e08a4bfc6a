"""Each file-writing command's paths, checked in one line before anything is read: a missing
input, an existing output without --overwrite, an output equal to, inside or holding an
input. Torch-free: cli.py runs these before the command's heavy imports (~10 s on a laptop's
CPU), and the commands run them again where they are called directly."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from megabridge import outputs
from megabridge.errors import UserError


def existing(args: argparse.Namespace, *names: str) -> list[str]:
    """The paths given for the options ``names`` (argparse dests), each refused in one line
    where it does not exist."""
    paths = []
    for name in names:
        path = getattr(args, name)
        if path is None:
            continue
        if not os.path.exists(path):
            raise UserError(f"--{name.replace('_', '-')} {path} does not exist")
        paths.append(path)
    return paths


def hf_to_megatron(args: argparse.Namespace) -> Path:
    """``convert hf-to-megatron``'s output, checked against its input."""
    return outputs.check_output(args.megatron_path, args.overwrite, existing(args, "hf_path"))


def megatron_to_hf(args: argparse.Namespace) -> Path:
    """``convert megatron-to-hf``'s output, checked against its checkpoint and references."""
    inputs = existing(args, "megatron_path", "hf_reference", "hf_config")
    return outputs.check_output(args.hf_path, args.overwrite, inputs)


EXPORT_INPUTS = ("megatron_path", "base", "hf_reference", "hf_config")


def export_outputs(hf_path, adapter_path, overwrite: bool, given: Mapping[str, object]) -> None:
    """``export``'s outputs (merged model and / or adapter, either may be None), each checked
    against its inputs: the EXPORT_INPUTS of ``given`` (paths by name, None where not given;
    a name missing from it is a KeyError, so the CLI and peft.export_checkpoint stay in step)."""
    inputs = [given[name] for name in EXPORT_INPUTS if given[name] is not None]
    for out in filter(None, [hf_path, adapter_path]):
        outputs.check_output(out, overwrite, inputs)


def export(args: argparse.Namespace) -> None:
    existing(args, *EXPORT_INPUTS)
    export_outputs(args.hf_path, args.adapter_path, args.overwrite, vars(args))
