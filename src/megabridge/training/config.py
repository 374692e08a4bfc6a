"""The training configuration: small typed dataclasses and dotted overrides.

A recipe is a function returning a complete ``ConfigContainer``; the command
line changes it with ``section.field=value`` overrides, checked against the
field types here. Field help strings feed ``megabridge train --help-config``.
Names follow Megatron-Bridge so its users feel at home.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from megabridge.errors import ConfigError
from megabridge.models.config import ModelConfig, option, validate_model_config
from megabridge.peft.targets import config_problems


@dataclass
class TrainConfig:
    train_iters: int = option(100, "number of optimizer steps to run")
    global_batch_size: int = option(8, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = option(1, "sequences per forward/backward on one rank")
    eval_interval: int | None = option(None, "evaluate every N iterations (None: never)")
    eval_iters: int = option(4, "micro-batch groups (global batches) per evaluation")
    exit_signal_handler: bool = option(
        True, "on SIGTERM/SIGUSR1: finish the iteration, save a checkpoint and exit 0"
    )
    exit_duration_in_mins: float | None = option(
        None, "save and exit once the run has taken this many minutes (setup included)"
    )
    skip_nonfinite_limit: int = option(
        3, "consecutive iterations with a NaN/Inf loss or grad norm skipped before stopping"
    )


@dataclass
class OptimizerConfig:
    optimizer: Literal["adam", "sgd"] = option("adam", "optimizer")
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of decay")
    weight_decay: float = option(0.01, "decoupled weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.95, "Adam beta2")
    adam_eps: float = option(1e-8, "Adam epsilon")
    clip_grad: float = option(1.0, "gradient clipping by global norm (0: off)")
    use_distributed_optimizer: bool = option(False, "shard optimizer state over data parallel")
    store_param_remainders: bool = option(
        True,
        "bf16 AdamW on a GPU: keep each fp32 main weight as its bf16 model weight plus a "
        "16-bit remainder (2 bytes a parameter less, the same fp32 values; checkpoints hold "
        "fp32 main weights as before); not with the distributed optimizer, whose fp32 shards stay",
    )


@dataclass
class SchedulerConfig:
    lr_warmup_iters: int = option(0, "linear warmup iterations")
    lr_decay_iters: int | None = option(None, "decay iterations (None: train.train_iters)")
    lr_decay_style: Literal["cosine", "linear", "constant", "inverse-square-root", "WSD"] = option(
        "cosine", "decay shape after warmup"
    )
    lr_warmup_init: float = option(0.0, "learning rate at the start of warmup")


@dataclass
class DatasetConfig:
    type: Literal["mock", "indexed", "sft"] = option(
        "mock", "mock (synthetic tokens), indexed (Megatron .bin/.idx) or sft (JSONL)"
    )
    seq_length: int | None = option(None, "tokens per sample (None: model.seq_length)")
    blend: list[str] = option(
        [], "indexed: prefixes, optionally weighted: 'w1,prefix1,w2,prefix2' or 'prefix'"
    )
    split: str = option("969,30,1", "indexed: train,valid,test split weights")
    path: str | None = option(None, "sft: JSONL file or folder with train/validation JSONL")
    packed: bool = option(True, "sft: pack examples into full sequences")
    valid_fraction: float = option(0.05, "sft: fraction held out for eval when no valid file")


@dataclass
class TokenizerConfig:
    path: str | None = option(None, "HF tokenizer folder (None: the model's HF folder, if any)")


@dataclass
class LoggerConfig:
    log_interval: int = option(1, "print and record metrics every N iterations")
    log_dir: str | None = option(None, "metrics.jsonl + TensorBoard (None: <run dir>/logs)")
    tensorboard: bool = option(True, "write TensorBoard events")
    wandb_project: str | None = option(None, "log to this W&B project (extra: megabridge[wandb])")
    wandb_entity: str | None = option(None, "W&B entity (user or team; None: your default)")
    wandb_exp_name: str | None = option(None, "W&B run name (None: W&B picks one)")
    wandb_save_dir: str | None = option(None, "W&B's local files (None: logger.log_dir)")
    wandb_mode: Literal["online", "offline", "disabled"] | None = option(
        None, "online, offline or disabled (None: the WANDB_MODE variable, else online)"
    )
    mlflow_tracking_uri: str | None = option(
        None, "log to this MLflow store: http(s)://server or sqlite:///file (extra: [mlflow])"
    )
    mlflow_experiment: str = option("megabridge", "MLflow experiment (created if missing)")
    mlflow_run_name: str | None = option(None, "MLflow run name (None: MLflow picks one)")


@dataclass
class CheckpointConfig:
    save: str | None = option(None, "checkpoint folder (None: <run dir>/checkpoints)")
    load: str | None = option(None, "resume from this folder's latest complete checkpoint")
    save_interval: int | None = option(None, "save every N iterations (and at the end)")
    save_at_end: bool = option(
        True,
        "save when training ends (false: only every save_interval, or never without one: for "
        "benchmarks and throwaway runs; a stop by signal or time limit still saves)",
    )
    keep_last_n: int | None = option(None, "keep only the N newest checkpoints")
    pretrained_checkpoint: str | None = option(
        None, "start from these weights: an HF model folder or a Megatron checkpoint"
    )
    hf_config: str | None = option(
        None,
        "an HF model folder or config.json that describes a Megatron-LM / Megatron-Bridge / NeMo 2 "
        "checkpoint (load or pretrained_checkpoint) carrying no model description",
    )
    run_dir: str = option("runs", "parent of the default per-run folder")
    save_hf: bool = option(
        False, "also write an HF copy into each checkpoint: hf/ (LoRA/DoRA: hf_adapter/, peft's)"
    )


@dataclass
class RNGConfig:
    seed: int = option(1234, "seed for weights, data order and dropout")


@dataclass
class DistConfig:
    distributed_timeout_minutes: int = option(10, "collective timeout; a dead rank fails the job")
    overlap_grad_reduce: bool = option(False, "overlap the gradient all-reduce with backward")
    overlap_param_gather: bool = option(False, "overlap the param all-gather (dist. optimizer)")


@dataclass
class PEFTConfig:
    method: Literal["none", "lora", "dora"] = option("none", "parameter-efficient fine-tuning")
    target_modules: list[str] = option(
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        "layers to adapt: Megatron names (linear_qkv) or HF names (q_proj, ...)",
    )
    vision_target_modules: list[str] = option(
        [],
        "the vision tower's layers to adapt too (Megatron names: linear_qkv, linear_proj, "
        "linear_fc1, linear_fc2; every vision-language family's tower); "
        "[]: the tower keeps its weights",
    )
    dim: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (scale = alpha / dim)")
    dropout: float = option(0.0, "dropout on the adapter input")


@dataclass
class ConfigContainer:
    name: str = option("run", "the recipe's name (names the default run folder)")
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rng: RNGConfig = field(default_factory=RNGConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    peft: PEFTConfig = field(default_factory=PEFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- overrides


def all_keys(cfg: ConfigContainer) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every overridable dotted key -> (owning dataclass, field)."""
    keys: dict[str, tuple[Any, dataclasses.Field]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                keys[f"{f.name}.{sub.name}"] = (value, sub)
        else:
            keys[f.name] = (cfg, f)
    return keys


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or None"
    if origin is list:
        return f"a comma-separated list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a JSON object"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(text: str, tp: Any) -> Any:
    """Parse ``text`` as type ``tp``; raise ValueError when it is not one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is Literal:
        choices = typing.get_args(tp)
        if text in choices:
            return text
        raise ValueError(text)
    if origin is list:
        (item,) = typing.get_args(tp)
        text = text.strip()
        if text.startswith("["):
            parts = [str(p) for p in json.loads(text)]
        else:
            parts = [p.strip() for p in text.split(",") if p.strip()]
        return [parse_value(p, item) for p in parts]
    if tp is dict or origin is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(text) from e
        if not isinstance(value, dict):
            raise ValueError(text)
        return value
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise ValueError(f"unsupported type {tp}")


def apply_overrides(cfg: ConfigContainer, overrides: list[str]) -> ConfigContainer:
    """Apply ``section.field=value`` strings to ``cfg`` in place; ConfigError on a bad one."""
    keys = all_keys(cfg)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.field=value")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        owner, f = keys[key]
        tp = typing.get_type_hints(type(owner))[f.name]
        try:
            value = parse_value(text, tp)
        except (ValueError, json.JSONDecodeError):
            raise ConfigError(f"{key}={text!r}: expected {_type_name(tp)}") from None
        setattr(owner, f.name, value)
    return cfg


def describe(cfg: ConfigContainer) -> str:
    """One line per key: name, type, current value and help (for --help-config)."""
    lines = []
    for key, (owner, f) in all_keys(cfg).items():
        tp = typing.get_type_hints(type(owner))[f.name]
        value = getattr(owner, f.name)
        help = f.metadata.get("help", "") + (
            " (torch spec only)" if f.metadata.get("torch_only") else ""
        )
        lines.append(f"  {key} = {value!r}  [{_type_name(tp)}]\n      {help}")
    return "\n".join(lines)


FREEZE_VISION = ("freeze_vision_model", "freeze_vision_projection")
# The vision-language families whose training is tested against transformers
# (tests/unit_tests/data/test_vision_sft.py, test_vision_families_sft.py): another is refused
# until its positions, features and attention are checked the same way.
TRAINABLE_VISION = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3_vl", "llava", "mistral3")


def check_pretrained(cfg: ConfigContainer) -> None:
    """finetune's refusal to start from random weights; torch-free, so the CLI answers at once."""
    if not (cfg.checkpoint.pretrained_checkpoint or cfg.checkpoint.load):
        raise ConfigError(
            "finetune needs a pretrained model: --pretrained / checkpoint.pretrained_checkpoint="
            "<HF folder or converted checkpoint> (or checkpoint.load=<this run's save folder>)"
        )


def validate(cfg: ConfigContainer, world_size: int) -> None:
    """Raise ConfigError naming every inconsistency between sections."""
    validate_model_config(cfg.model)
    m, t = cfg.model, cfg.train
    model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size
    problems = []
    if world_size % model_parallel:
        problems.append(f"{world_size} processes are not divisible by TP x PP = {model_parallel}")
    if m.num_moe_experts:
        expert_parallel = m.expert_model_parallel_size * m.tensor_model_parallel_size
        if world_size % (expert_parallel * m.pipeline_model_parallel_size):
            problems.append(
                f"{world_size} processes are not divisible by EP x TP x PP = "
                f"{expert_parallel * m.pipeline_model_parallel_size} (experts are split over "
                "EP x TP ranks within each pipeline stage)"
            )
        if m.tensor_model_parallel_size > 1 and not m.sequence_parallel:
            problems.append("MoE with tensor_model_parallel_size > 1 trains only with "
                            "model.sequence_parallel=true (megatron-core's rule)")  # fmt: skip
    dp = max(world_size // model_parallel, 1)
    for name in ("micro_batch_size", "global_batch_size", "train_iters"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)} must be at least 1")
    if problems:
        raise ConfigError("; ".join(problems))
    if t.global_batch_size % (t.micro_batch_size * dp):
        problems.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}"
        )
    seq = cfg.dataset.seq_length or m.seq_length
    if seq > m.seq_length and m.position_embedding_type == "learned_absolute":
        problems.append(f"dataset.seq_length={seq} exceeds model.seq_length={m.seq_length}")
    if cfg.peft.method != "none":
        problems += config_problems(cfg)
    problems += _vision_problems(cfg)
    if cfg.logger.log_interval < 1:
        problems.append("logger.log_interval must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))


def _vision_problems(cfg: ConfigContainer) -> list[str]:
    """What vision-language training does not do yet, and freezing asked of a text model."""
    m = cfg.model
    freezing = [f"model.{n}" for n in FREEZE_VISION if getattr(m, n)]
    if m.vision is None:
        return [f"{', '.join(freezing)}: the model has no vision tower"] if freezing else []
    if m.family not in TRAINABLE_VISION:
        return [f"training a vision-language model ({m.family}) is not supported yet"]
    problems = []
    if cfg.dataset.type != "sft":
        problems.append(
            f"a vision-language model trains on dataset.type=sft (chat JSONL with images), "
            f"not {cfg.dataset.type}"
        )
    elif cfg.dataset.packed:
        problems.append(
            "packed samples are not supported yet for a vision-language model: set "
            "dataset.packed=false"
        )
    return problems
