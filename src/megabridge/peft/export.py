"""``megabridge export``: a LoRA/DoRA training checkpoint -> HF, merged and/or as a peft adapter.

    megabridge export --megatron-path CKPT --hf-path OUT        base + adapters merged: an HF
                                                                model folder transformers loads
    megabridge export --megatron-path CKPT --adapter-path OUT   the adapters alone, as peft saves
                                                                them (PeftModel.from_pretrained)

Both at once is one command with both options. A PEFT checkpoint holds only the
adapters; the frozen base is rebuilt from the pretrained model it records (an HF
folder or a Megatron checkpoint; ``--base`` points elsewhere if it moved). The
model is built in fp32: merging is W + s B A in fp32, cast to the output dtype
(the base's own dtypes, or ``--dtype``). Any TP/PP layout works (torchrun).

Adapter names come from the family's weight mappings, never from a family
table here: the Megatron B of a fused layer goes through the same mapping as
the base weight (QKV's per-group split, GatedMLP's [gate; up]) as if it were a
weight; A, shared by every projection of the fused layer, is copied to each.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist

from megabridge import command_paths, outputs
from megabridge.conversion import transfer
from megabridge.conversion.auto_bridge import AutoBridge, _chunk_config
from megabridge.conversion.commands import _dtype
from megabridge.errors import UserError
from megabridge.models import init as weight_init
from megabridge.models.config import model_config_from_dict
from megabridge.peft import lora
from megabridge.training import checkpointing

log = logging.getLogger("megabridge.export")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Megatron adapter parameter -> the name of its tensor under a peft module.
_PEFT_SUFFIX = {
    "lora_a": "lora_A.weight",
    "lora_b": "lora_B.weight",
    "lora_magnitude": "lora_magnitude_vector",
}


class _Shared:
    """A as a "mapping": the one A of a fused layer, copied to each of its HF projections;
    ``padded``: the layer's own mapping, whose input is zero-padded (a tower's fc2:
    conversion/vit.py VisionDown), drops A's padded columns as it drops the weight's."""

    def __init__(self, count: int, padded=None):
        self.count, self.padded = count, padded

    def megatron_to_hf(self, tensor: torch.Tensor, cfg) -> list[torch.Tensor]:
        if self.padded is not None:
            (tensor,) = self.padded.megatron_to_hf(tensor, cfg)
        return [tensor.clone() for _ in range(self.count)]

    def expert_of(self, megatron_name: str) -> None:
        return None  # whole HF tensors, never one expert's slice of stacked ones (Mapping's)


class _AdapterNames:
    """Stands in for the family bridge in transfer.export_hf_weights: adapter -> peft names."""

    def __init__(self, family, module_path=None):
        self.family = family
        self.module_path = module_path or (lambda name: name)

    def resolve(self, megatron_name: str):
        layer, _, param = megatron_name.rpartition(".")
        mapping, hf_weights = self.family.resolve(f"{layer}.weight")
        modules = [
            f"base_model.model.{self.module_path(w).removesuffix('.weight')}" for w in hf_weights
        ]
        names = tuple(f"{m}.{_PEFT_SUFFIX[param]}" for m in modules)
        if param == "lora_a":
            padded = mapping if getattr(mapping, "PADDED_INPUT", False) else None
            return _Shared(len(names), padded), names
        return mapping, names


def hf_module_paths(bridge):
    """Checkpoint tensor name -> the parameter's name in transformers' model, for peft.

    A text model's names are the same. A vision-language model's are not: transformers 5
    renames on load (Qwen2.5-VL: ``model.layers.*`` -> ``model.language_model.layers.*``,
    ``visual.*`` -> ``model.visual.*``), and peft matches adapters to the renamed modules.
    The renaming is transformers' own (conversion_mapping), applied to the model built on
    the meta device; None for a text model."""
    if not getattr(bridge.family, "VISION", False):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping

    config = AutoConfig.for_model(**bridge.hf_config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    renames = get_model_conversion_mapping(model)
    known = {name for name, _ in model.named_parameters()}

    def module_path(name: str) -> str:
        for rename in renames:
            name, _ = rename.rename_source_key(name)
        assert name in known, f"transformers' model has no {name}"  # a renaming we missed
        return name

    return module_path


def _module_of(peft_name: str) -> str:
    """base_model.model.<module path>.<adapter tensor> -> the module path."""
    path = peft_name.removeprefix("base_model.model.")
    return next(path.removesuffix(f".{s}") for s in _PEFT_SUFFIX.values() if path.endswith(s))


def _layer_pattern(modules) -> str:
    """A regex matching exactly these module paths, with any layer number (peft's
    target_modules as a string is matched whole against every module's path)."""
    paths = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) for m in modules})
    return "^(?:" + "|".join(paths) + ")$"


def adapter_config(settings: dict, family, base_name: str | None, modules=None) -> dict:
    """adapter_config.json for peft's LoraConfig (fields it does not get: its defaults).

    ``modules``: the adapted modules' paths; given, target_modules is a pattern of exactly
    those (a vision-language model's tower has layers of the same names, adapted only as
    peft.vision_target_modules asks)."""
    by_target = lora.hf_names_by_target(family)
    targets = sorted(h for t in settings["target_modules"] for h in by_target[t])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": settings["dim"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "use_dora": settings["method"] == "dora",
        "use_rslora": False,
        "target_modules": targets if modules is None else _layer_pattern(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def save_adapter(model, bridge, out, settings: dict, dtype=None, overwrite=False, base_name=None):
    """Write ``out`` in peft's format (rank 0 writes; every rank must call it). Atomic."""
    from safetensors.torch import save_file

    chunks = lora._unwrapped(model)
    module_path = hf_module_paths(bridge)
    tensors = transfer.export_hf_weights(
        chunks,
        _AdapterNames(bridge.family, module_path),
        _chunk_config(chunks),
        (lambda name: dtype) if dtype is not None else None,
        include=lora.is_adapter,
    )
    gathered = {name: t.detach().contiguous().cpu() for name, t in tensors}  # a collective
    if dist.get_rank() == 0:
        with outputs.output_folder(out, overwrite, bridge.inputs()) as tmp:
            save_file(gathered, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            modules = None
            if module_path is not None:  # peft's names: base_model.model.<path>.lora_A.weight
                modules = {_module_of(n) for n in gathered}
            config = adapter_config(settings, bridge.family, base_name, modules)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    dist.barrier()
    return Path(out)


def _build_base(ckpt: Path, meta: dict, base: str | None, tp: int, pp: int, hf_config=None):
    """(bridge, model chunks) with the frozen base weights the adapters were trained on, in fp32."""
    cfg = model_config_from_dict(meta["model_config"])
    cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size = tp, pp
    cfg.expert_model_parallel_size, cfg.sequence_parallel = 1, False
    cfg.bf16 = False  # merge in fp32; the outputs take the base's dtypes (or --dtype)
    if base is None:  # trained on megabridge's seeded initialisation
        bridge = AutoBridge.from_megatron_checkpoint(ckpt)
        model = bridge.to_megatron_model(cfg, load_weights=False)
        weight_init.initialize(model, cfg, meta["peft"]["seed"])
        return bridge, model
    if not Path(base).exists():
        raise UserError(
            f"the base model {base} (recorded in {ckpt}) does not exist; pass --base PATH"
        )
    if (Path(base) / "config.json").is_file():
        bridge = AutoBridge.from_hf_pretrained(base, text_only=cfg.vision is None)
    else:
        # a foreign base (Megatron-LM, Megatron-Bridge, NeMo 2) read like convert reads it
        hf_config = hf_config or meta["peft"].get("base_hf_config")
        bridge = AutoBridge.from_megatron_checkpoint(base, hf_config)
    checkpointing.check_architecture(ckpt, bridge.model_config)
    return bridge, bridge.to_megatron_model(cfg)


def export_checkpoint(
    megatron_path,
    hf_path=None,
    adapter_path=None,
    base: str | None = None,
    hf_reference=None,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    hf_config=None,
) -> None:
    """Export a PEFT training checkpoint: merged into its base (``hf_path``), alone (``adapter_path``).

    ``hf_config``: an HF model folder or config.json describing a base checkpoint that
    Megatron-LM / Megatron-Bridge / NeMo 2 wrote without a model description (default:
    the one training was given, as recorded)."""
    if hf_path is None and adapter_path is None:
        raise UserError("nothing to export: pass --hf-path (merged model) and/or --adapter-path")
    given = dict(megatron_path=megatron_path, base=base, hf_reference=hf_reference,
                 hf_config=hf_config)  # fmt: skip
    command_paths.export_outputs(hf_path, adapter_path, overwrite, given)
    ckpt = checkpointing.resolve(megatron_path)
    meta = checkpointing.read_metadata(ckpt, hf_config)
    settings = meta.get("peft")
    if settings is None:
        raise UserError(
            f"{ckpt} has no LoRA/DoRA adapters; export a full checkpoint with "
            "`megabridge convert megatron-to-hf`"
        )
    base = str(Path(base).resolve()) if base else settings["base"]
    bridge, model = _build_base(ckpt, meta, base, tp, pp, hf_config)
    if hf_reference:
        bridge.use_hf_reference(hf_reference)
    lora.add_adapters(model, settings)
    checkpointing.load(ckpt, model, model_only=True)
    if adapter_path is not None:
        hf_base = base if base and (Path(base) / "config.json").is_file() else None
        save_adapter(model, bridge, adapter_path, settings, dtype, overwrite, hf_base)
        log.info("wrote %s adapter %s", settings["method"], adapter_path)
    if hf_path is not None:
        lora.merge_and_unload(model)
        bridge.save_hf_pretrained(model, hf_path, dtype, overwrite, progress=True)
        log.info("wrote merged HF model %s", hf_path)


# ------------------------------------------------------------------ CLI


def cmd_export(args: argparse.Namespace) -> int:
    export_checkpoint(
        args.megatron_path, args.hf_path, args.adapter_path, args.base, args.hf_reference,
        args.tp, args.pp, _dtype(args.dtype), args.overwrite, args.hf_config,
    )  # fmt: skip
    return 0
