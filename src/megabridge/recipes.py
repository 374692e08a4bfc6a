"""The recipe registry: every ``*_config`` function in ``megabridge.models.<family>.recipes``.

A family's recipes are found by looking, not by being listed here: adding a
family folder with a recipes.py adds its recipes.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from collections.abc import Callable

import megabridge.models as models_pkg
from megabridge import catalog
from megabridge.models.config import ModelConfig
from megabridge.peft.targets import default_targets
from megabridge.training.config import ConfigContainer


def all_recipes() -> dict[str, Callable[[], ConfigContainer]]:
    found: dict[str, Callable[[], ConfigContainer]] = {}
    for info in pkgutil.iter_modules(models_pkg.__path__):
        if not info.ispkg:
            continue
        try:
            module = importlib.import_module(f"megabridge.models.{info.name}.recipes")
        except ModuleNotFoundError as e:
            if e.name == f"megabridge.models.{info.name}.recipes":
                continue
            raise
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.endswith("_config") and fn.__module__ == module.__name__:
                found[name] = fn
    return dict(sorted(found.items()))


def get_recipe(name: str) -> ConfigContainer:
    catalog.check_recipe(name)
    return all_recipes()[name]()


def describe_recipe(name: str) -> str:
    doc = inspect.getdoc(all_recipes()[name]) or ""
    return doc.splitlines()[0] if doc else ""


# --------------------------------------------------------------- building blocks for families


def sized(bridge, size: dict, seq_length: int = 4096) -> ModelConfig:
    """The ModelConfig of one of a family's sizes.

    ``size`` holds HF config.json fields (its SIZES table in recipes.py); the family's
    ``bridge`` reads them exactly as it reads a checkpoint's config.json, so a size's
    shapes have one source, and a recipe trains the model that converting the released
    checkpoint gives. ``seq_length`` is the length the recipe trains at, not the
    model's maximum (max_position_embeddings).
    """
    from transformers import AutoConfig  # heavy: only when a recipe is built

    # A copy: transformers writes into the dicts it is given (rope_scaling), not into SIZES.
    hf_config = AutoConfig.for_model(bridge.hf_model_type, **copy.deepcopy(size))
    cfg = bridge.model_config(hf_config)
    cfg.seq_length = seq_length
    return cfg


def pretrain(name: str, model) -> ConfigContainer:
    """A pretraining config on mock data for ``model`` (a ModelConfig)."""
    cfg = ConfigContainer(name=name, model=model)
    cfg.train.train_iters = 1000
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 32, 1
    cfg.optimizer.lr, cfg.optimizer.min_lr = 3e-4, 3e-5
    cfg.scheduler.lr_warmup_iters = 50
    cfg.checkpoint.save_interval = 500
    return cfg


def finetune(name: str, model, pretrained: str | None = None) -> ConfigContainer:
    """Full-parameter SFT from ``pretrained`` (an HF folder or a converted checkpoint)."""
    cfg = pretrain(name, model)
    cfg.checkpoint.pretrained_checkpoint = pretrained
    cfg.train.train_iters = 200
    cfg.train.global_batch_size = 16
    cfg.optimizer.lr, cfg.optimizer.min_lr = 1e-5, 1e-6
    cfg.optimizer.weight_decay = 0.0
    cfg.scheduler.lr_warmup_iters = 10
    cfg.checkpoint.save_interval = 100
    cfg.dataset.type = "sft"
    cfg.train.eval_interval = 50
    return cfg


def as_lora(cfg: ConfigContainer, name: str | None = None) -> ConfigContainer:
    """A finetune config turned into LoRA of the same model and layout: a recipe's LoRA
    variant is its SFT recipe with the adapters and their learning rate."""
    cfg.name = name or cfg.name
    cfg.peft.method = "lora"
    cfg.peft.dim, cfg.peft.alpha = 16, 32.0
    cfg.peft.target_modules = default_targets(cfg.model)
    # The adapters wrap Megatron-Core's own parallel linears, not TE's layer-norm-fused ones.
    cfg.model.transformer_impl = "torch"
    cfg.optimizer.lr, cfg.optimizer.min_lr = 1e-4, 1e-5
    return cfg


def tiny_pretrain(name: str, model) -> ConfigContainer:
    """pretrain() sized for tests and smoke runs: 20 short steps, no periodic checkpoints."""
    cfg = pretrain(name, model)
    cfg.model.seq_length = 128
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = 20, 8, 4
    cfg.optimizer.lr = 3e-3
    cfg.scheduler.lr_warmup_iters = 2
    cfg.checkpoint.save_interval = None
    return cfg


def tiny_finetune(name: str, model) -> ConfigContainer:
    """finetune() sized for tests and smoke runs: 20 steps of micro-batch 1, eval at 10."""
    cfg = finetune(name, model)
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = 20, 8, 1
    cfg.optimizer.lr = 1e-3
    cfg.scheduler.lr_warmup_iters = 2
    cfg.checkpoint.save_interval = None
    cfg.train.eval_interval, cfg.train.eval_iters = 10, 1
    return cfg


def vlm_finetune(name: str, model) -> ConfigContainer:
    """finetune() of a vision-language model: padded samples (packing VLM samples is not
    supported yet; Gemma 3's bidirectional image attention does not take packed sequences)."""
    cfg = finetune(name, model)
    cfg.dataset.packed = False
    return cfg


def tiny_vlm_finetune(name: str, model) -> ConfigContainer:
    """tiny_finetune() of a vision-language model (tests, smoke runs): padded samples,
    sequences of 128 tokens, micro-batch 2; set checkpoint.pretrained_checkpoint and
    dataset.path."""
    cfg = tiny_finetune(name, model)
    cfg.dataset.packed = False
    cfg.model.seq_length = 128
    cfg.train.micro_batch_size = 2
    return cfg
