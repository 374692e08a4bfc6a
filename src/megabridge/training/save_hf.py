"""``checkpoint.save_hf=true``: an HF copy inside every Megatron checkpoint.

    iter_0000010/
      hf/            full fine-tuning / pretraining: config.json, safetensors, tokenizer
                     and generation files; AutoModelForCausalLM.from_pretrained loads it
      hf_adapter/    LoRA / DoRA runs: the adapters as peft saves them
                     (PeftModel.from_pretrained on the base model)

The folder is written into the checkpoint's temporary folder before it is sealed,
so it is as atomic as the checkpoint and goes away with it when pruned. The
weights come through the weight-sync stream (conversion/weight_sync.py): one
parameter gathered at a time and sent to rank 0, which writes shards as they fill,
so the whole model is never in one rank's memory at any TP / PP / EP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.registry import bridge_for_family
from megabridge.peft.export import save_adapter
from megabridge.training.data.tokenizer import tokenizer_path

log = logging.getLogger("megabridge.train")

HF_DIR = "hf"
ADAPTER_DIR = "hf_adapter"


def bridge_for_run(cfg) -> AutoBridge:
    """The bridge that names the run's weights the HF way: from the pretrained model if
    there is one (its config.json, shard layout, dtypes, tokenizer), else from the recipe."""
    pretrained = cfg.checkpoint.pretrained_checkpoint
    if pretrained and (Path(pretrained) / "config.json").is_file():
        bridge = AutoBridge.from_hf_pretrained(pretrained, text_only=cfg.model.vision is None)
    elif pretrained:
        bridge = AutoBridge.from_megatron_checkpoint(pretrained, cfg.checkpoint.hf_config)
    else:
        family = bridge_for_family(cfg.model.family)
        bridge = AutoBridge(family, cfg.model, family.hf_config_dict(cfg.model))
    tokenizer = tokenizer_path(cfg)
    if tokenizer:
        bridge.sidecar_dir = Path(tokenizer)
    return bridge


def writer(cfg, bridge: AutoBridge, model) -> Callable[[Path], None]:
    """What checkpointing.save calls, on every rank, with the checkpoint's temporary folder."""

    def write(folder: Path) -> None:
        start = time.perf_counter()
        settings = _peft_settings(model)
        if settings is not None:
            base = settings.get("base")
            hf_base = base if base and (Path(base) / "config.json").is_file() else None
            save_adapter(model, bridge, folder / ADAPTER_DIR, settings, base_name=hf_base)
            out = folder / ADAPTER_DIR
        else:
            out = folder / HF_DIR
            if bridge.save_hf_pretrained(model, out) is not None:
                _add_generation_config(out)
        elapsed = time.perf_counter() - start
        if elapsed > 1.0:
            log.info("wrote %s in %.1f s", out.name, elapsed)

    return write


def _peft_settings(model) -> dict | None:
    from megatron.core.utils import unwrap_model

    return getattr(unwrap_model(model[0]), "megabridge_peft", None)


def _add_generation_config(folder: Path) -> None:
    """generation_config.json from config.json when no source folder gave one (rank 0)."""
    if (folder / "generation_config.json").is_file():
        return
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    GenerationConfig.from_model_config(config).save_pretrained(str(folder))
