"""Checkpoints other tools wrote: Megatron-LM, Megatron-Bridge and NeMo 2 (torch_dist format).

All three store the weights as a Megatron-Core distributed checkpoint with the same
tensor keys megabridge writes; they differ in where the model's description lives:

* Megatron-LM: ``iter_NNNNNNN/`` + ``latest_checkpointed_iteration.txt``; the run's
  argparse Namespace under ``args`` in the common state (``common.pt``; newer
  Megatron-LM keeps the common state as a ``common_state`` byte item of the
  ``*.distcp`` files instead). Its vocabulary rows are padded (``padded_vocab_size``).
* Megatron-Bridge: the same, plus ``run_config.yaml`` in each ``iter_*`` folder, whose
  ``model`` section holds the model provider's fields (Megatron-Core config names)
  and its class under ``_target_``.
* NeMo 2: ``<checkpoint>/context/model.yaml`` (the model's ``config`` section, same
  names, class under ``_target_``) and ``<checkpoint>/weights/`` (the distributed
  checkpoint, keys prefixed ``module.``).

Legacy (non-distributed) Megatron-LM checkpoints (``iter_*/mp_rank_*/model_optim_rng.pt``)
are whole pickles: loading one runs whatever code it names, so they are refused.

From the checkpoint's own description (or ``--hf-config``, an HF config.json, when it
has none) this module makes the ``megabridge.json`` metadata megabridge would have
written, so that everything downstream treats a foreign checkpoint like its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from megabridge.conversion import registry, tiny
from megabridge.errors import CheckpointError, UserError
from megabridge.models.config import ModelConfig, architecture
from megabridge.training import trust

DIST_CONFIG = "metadata.json"  # dist_checkpointing's; Megatron-Core writes it last
RUN_CONFIG = "run_config.yaml"  # Megatron-Bridge
NEMO_CONTEXT, NEMO_WEIGHTS, NEMO_MODEL = "context", "weights", "model.yaml"
LEGACY_FILE = "model_optim_rng.pt"
# what to pass when the checkpoint does not say which model it holds (CLI, then training)
HF_CONFIG_HINT = (
    "--hf-config <HF model folder or config.json> of the model (training: "
    "checkpoint.hf_config=<the same>)"
)

# Fields whose Megatron-Core / Megatron-LM name differs from ours: their name -> ours.
_RENAMES = {
    "norm_epsilon": "layernorm_epsilon",  # Megatron-LM's argument
    "num_experts": "num_moe_experts",  # Megatron-LM's argument
    "max_position_embeddings": "seq_length",
    "padded_vocab_size": "vocab_size",  # Megatron-LM: the embedding's rows
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
}
# Model classes (the last part of ``_target_``) -> family, longest prefix first.
_CLASS_FAMILIES = (
    ("Qwen3Moe", "qwen3_moe"),
    ("Qwen3MoE", "qwen3_moe"),
    ("Qwen2Moe", "qwen2_moe"),
    ("Qwen3", "qwen3"),
    ("Qwen2", "qwen2"),
    ("Llama", "llama"),
    ("Mistral", "mistral"),
    ("Mixtral", "mixtral"),
    ("Gemma3", "gemma3"),
    ("Gemma2", "gemma2"),
    ("Phi3", "phi3"),
    ("OLMo2", "olmo2"),
    ("Olmo2", "olmo2"),
    ("DeepSeekV3", "deepseek_v3"),
)
# A Megatron-LM MoE run: the features (on/off) that tell MoE families apart, where a
# family's MEGATRON_FIXED leaves them open; and fixed values that are the run's training
# choices (its balance loss, its routing precision), not the model's.
_MOE_FEATURES = (
    "qk_layernorm", "add_qkv_bias", "add_bias_linear", "qk_norm_across_heads",
    "attention_sinks", "multi_latent_attention", "moe_router_enable_expert_bias",
    "moe_shared_expert_gate", "moe_shared_expert_intermediate_size", "rotary_interleaved",
)  # fmt: skip
_TRAINING_CHOICES = ("moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_router_dtype")
# Megatron-Bridge 0.6 describes most GPT-shaped models with its generic provider (a family
# bridge sets its fields): then the fields, not the class, tell the family.
_GENERIC_CLASSES = ("GPTModelProvider",)
# A Megatron-LM run names no model class; a dense decoder is recognised by what it has.
# (field, value) that must hold -> family; the first rule that holds wins.
_ARGS_FAMILIES = (
    ({"qk_layernorm": True, "add_qkv_bias": False}, "qwen3"),
    ({"qk_layernorm": False, "add_qkv_bias": True}, "qwen2"),
    ({"qk_layernorm": False, "add_qkv_bias": False}, "llama"),
)


def kind(ckpt_dir: Path) -> str | None:
    """Which tool wrote ``ckpt_dir`` (one checkpoint), or None when it is none of theirs."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / NEMO_CONTEXT).is_dir() and (ckpt_dir / NEMO_WEIGHTS).is_dir():
        return "nemo2"
    if any((p / LEGACY_FILE).is_file() for p in ckpt_dir.glob("mp_rank_*")):
        return "legacy"
    if (ckpt_dir / RUN_CONFIG).is_file():
        return "megatron-bridge"
    if (ckpt_dir / DIST_CONFIG).is_file() and _megatron_lm_args_or_none(ckpt_dir) is not None:
        return "megatron-lm"  # (a megabridge save that lost megabridge.json holds no args)
    return None


def looks_like_checkpoint(path: Path) -> bool:
    return kind(path) in ("nemo2", "legacy")


def dist_dir(ckpt_dir: Path) -> Path:
    """The folder holding the distributed checkpoint itself."""
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir / NEMO_WEIGHTS if kind(ckpt_dir) == "nemo2" else ckpt_dir


def verify(ckpt_dir: Path) -> str | None:
    """Why a foreign checkpoint folder is not complete, or None. Legacy ones are refused."""
    what = kind(ckpt_dir)
    if what == "legacy":
        raise CheckpointError(
            f"{ckpt_dir} is a legacy (non-distributed) Megatron-LM checkpoint: its .pt files are "
            "pickles, which run code when loaded, so megabridge does not read them; convert it "
            "to torch_dist with Megatron-LM first (tools/checkpoint/convert.py --saver core "
            "--ckpt-format torch_dist) where you trust it"
        )
    weights = dist_dir(ckpt_dir)
    for name in (DIST_CONFIG, ".metadata"):  # metadata.json last: a finished save
        if not (weights / name).is_file():
            return f"no {name} in {weights} (the save did not finish)"
    return None


def key_prefix(ckpt_dir: Path) -> str:
    """The prefix of the checkpoint's model keys ('module.' for NeMo 2, else none)."""
    keys = trust.read_metadata(dist_dir(ckpt_dir)).state_dict_metadata
    if "embedding.word_embeddings.weight" in keys:
        return ""
    prefixed = [k for k in keys if k.endswith("embedding.word_embeddings.weight")]
    if len(prefixed) != 1:
        raise CheckpointError(f"{ckpt_dir} holds no GPT model weights (no word embeddings)")
    return prefixed[0].removesuffix("embedding.word_embeddings.weight")


def metadata(ckpt_dir: Path, hf_config: str | Path | None = None) -> dict:
    """What megabridge.json would say about this foreign checkpoint.

    ``hf_config``: an HF model folder or config.json that describes the model; needed
    when the checkpoint carries no description (or one megabridge cannot read).
    """
    ckpt_dir = Path(ckpt_dir)
    what = kind(ckpt_dir)
    if what is None:
        raise CheckpointError(f"{ckpt_dir} is not a Megatron checkpoint")
    verify(ckpt_dir)
    prefix = key_prefix(ckpt_dir)
    rows, dtype = _embedding(ckpt_dir, prefix)
    if hf_config is not None:
        cfg, hf = _from_hf_config(hf_config)
    else:
        cfg = _from_own_description(ckpt_dir, what)
        hf = registry.bridge_for_family(cfg.family).hf_config_dict(cfg)
    if cfg.vocab_size > rows:
        raise CheckpointError(
            f"{ckpt_dir} has {rows} vocabulary rows, the model config says {cfg.vocab_size}"
        )
    cfg.vocab_size = rows  # the checkpoint's (maybe padded) rows; HF's config keeps its own
    cfg.bf16 = dtype == "bfloat16"
    return {
        "format_version": 1,
        "iteration": _iteration(ckpt_dir),
        "train_state": {},
        "model": architecture(cfg),
        "model_config": asdict(cfg),
        "hf": {"config": hf},
        "foreign": {"kind": what, "key_prefix": prefix},
    }


def _embedding(ckpt_dir: Path, prefix: str) -> tuple[int, str]:
    """(rows, dtype) of the word embedding as stored."""
    entry = trust.read_metadata(dist_dir(ckpt_dir)).state_dict_metadata[
        f"{prefix}embedding.word_embeddings.weight"
    ]
    return int(entry.size[0]), str(entry.properties.dtype).removeprefix("torch.")


def _iteration(ckpt_dir: Path) -> int:
    name = Path(ckpt_dir).name
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:])
    return 0


def _from_hf_config(path: str | Path) -> tuple[ModelConfig, dict]:
    from transformers import AutoConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--hf-config / checkpoint.hf_config {path}: no config.json there")
    try:
        hf = json.loads(file.read_text())
        hf_config = AutoConfig.for_model(**hf)
    except (json.JSONDecodeError, ValueError, KeyError) as e:
        raise UserError(f"--hf-config {path}: not an HF model config ({e})") from None
    archs = hf.get("architectures") or []
    if not archs:
        raise UserError(f"--hf-config {file} names no architectures")
    return registry.bridge_for(archs[0]).model_config(hf_config), hf


def _from_own_description(ckpt_dir: Path, what: str) -> ModelConfig:
    """Our ModelConfig from the model description the checkpoint carries."""
    if what == "megatron-bridge":
        fields = _yaml(ckpt_dir / RUN_CONFIG).get("model") or {}
    elif what == "nemo2":
        fields = (_yaml(ckpt_dir / NEMO_CONTEXT / NEMO_MODEL).get("config")) or {}
    else:
        fields = _megatron_lm_args(ckpt_dir)
    if not fields:
        raise UserError(
            f"{ckpt_dir} carries no model description megabridge can read: pass {HF_CONFIG_HINT}"
        )
    family = _family(fields, ckpt_dir)
    if family is None:  # Megatron-LM's MoE arguments name no family: the one they fit
        return _moe_family_config(fields, ckpt_dir)
    cfg = _config(family, fields)
    wrong = _contradictions(cfg)
    if wrong:
        raise UserError(
            f"{ckpt_dir} does not describe a {cfg.family} model: {', '.join(wrong)}; pass "
            f"{HF_CONFIG_HINT}"
        )
    return cfg


def _config(family: str, fields: dict) -> ModelConfig:
    """A ``family`` ModelConfig with the description's fields."""
    cfg = ModelConfig(family=family)
    known = {f for f in asdict(cfg)}
    for name, value in fields.items():
        if name in _RENAMES.values() and _renamed_from(name) in fields:
            continue  # Megatron-LM's seq_length is the training length, not the model's
        name = _RENAMES.get(name, name)
        if name in known and name not in ("family", "bf16") and _plain(value):
            setattr(cfg, name, value)
    cfg.activation = _activation(fields)
    if "untie_embeddings_and_output_weights" in fields:  # Megatron-LM's argument
        cfg.share_embeddings_and_output_weights = not fields["untie_embeddings_and_output_weights"]
    if not fields.get("group_query_attention", True):  # Megatron-LM: no GQA, one group per head
        cfg.num_query_groups = cfg.num_attention_heads
    return cfg


def _moe_family_config(fields: dict, ckpt_dir: Path) -> ModelConfig:
    """The config of the one MoE family whose fixed values and features the arguments fit."""
    fits, moe = [], []
    for family in tiny.families():
        fixed = registry.bridge_for_family(family).MEGATRON_FIXED
        if "moe_router_score_function" not in fixed:
            continue  # a dense family
        moe.append(family)
        cfg = _config(family, fields)
        for name in _TRAINING_CHOICES:  # the run's loss, not the weights: the family's own
            if name in fixed:
                setattr(cfg, name, fixed[name])
        if not _contradictions(cfg) and _has_features_of(family, cfg):
            fits.append(cfg)
    if len(fits) == 1:
        return fits[0]
    which = (
        f"fit {' and '.join(c.family for c in fits)}"
        if fits
        else f"fit none of megabridge's MoE families ({', '.join(moe)})"
    )
    raise UserError(
        f"{ckpt_dir}: the checkpoint's arguments (a Megatron-LM mixture-of-experts model) "
        f"{which}: pass {HF_CONFIG_HINT}"
    )


def _has_features_of(family: str, cfg: ModelConfig) -> bool:
    """Whether each feature a family's fixed values leave open is on or off in ``cfg`` as in
    one of the family's tiny models (their variants span what its real models do)."""
    bridge = registry.bridge_for_family(family)
    seen = [bridge.model_config(tiny.tiny_config(family, v)) for v in tiny.variants(family)]
    for feature in _MOE_FEATURES:
        if feature in bridge.MEGATRON_FIXED:
            continue
        if bool(getattr(cfg, feature)) not in {bool(getattr(c, feature)) for c in seen}:
            return False
    return True


def _renamed_from(ours: str) -> str:
    return next(theirs for theirs, name in _RENAMES.items() if name == ours)


def _plain(value) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, bool | int | float | str)


def _activation(fields: dict) -> str:
    func = fields.get("activation_func")
    name = func.get("_target_", "") if isinstance(func, dict) else str(func or "")
    gated = fields.get("gated_linear_unit", False) or fields.get("swiglu", False)
    if fields.get("squared_relu"):
        return "squared_relu"
    if name.endswith("silu") or fields.get("swiglu"):
        if not gated:
            raise UserError("a Megatron model with an ungated SiLU MLP is not supported yet")
        return "swiglu"
    if "gelu" in name:
        return "geglu" if gated else "gelu"
    if name.endswith("relu"):
        return "relu"
    return "gelu"  # Megatron-Core's default activation


def _family(fields: dict, ckpt_dir: Path) -> str | None:
    """The family the description names or its dense arguments imply; None for MoE
    arguments without a class (_moe_family_config then finds the one they fit)."""
    target = str(fields.get("_target_", "")).rsplit(".", 1)[-1]
    if target and target not in _GENERIC_CLASSES:
        for prefix, family in _CLASS_FAMILIES:
            if target.startswith(prefix):
                return family
        raise UserError(
            f"{ckpt_dir}: megabridge has no family for model class {target}: pass {HF_CONFIG_HINT}"
        )
    if fields.get("num_experts") or fields.get("num_moe_experts"):
        return None
    for rule, family in _ARGS_FAMILIES:
        if all(bool(fields.get(k)) == v for k, v in rule.items()):
            return family
    raise UserError(
        f"{ckpt_dir}: the checkpoint's arguments do not say which model family it is: pass "
        f"{HF_CONFIG_HINT}"
    )


def _contradictions(cfg: ModelConfig) -> list[str]:
    """What in ``cfg`` contradicts what its family always is."""
    family = registry.bridge_for_family(cfg.family)
    return [
        f"{field}={getattr(cfg, field)!r} (a {cfg.family} has {value!r})"
        for field, value in family.MEGATRON_FIXED.items()
        if getattr(cfg, field) != value
    ]


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())  # plain YAML only: no tags, no objects
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _megatron_lm_args(ckpt_dir: Path) -> dict:
    """Megatron-LM's run arguments, from the common state, read with the allow-list."""
    common = trust.load_common_state(dist_dir(ckpt_dir))
    args = common.get("args") if isinstance(common, dict) else None
    return dict(vars(args)) if args is not None else {}


def _megatron_lm_args_or_none(ckpt_dir: Path) -> dict | None:
    try:
        return _megatron_lm_args(ckpt_dir) or None
    except Exception:  # noqa: BLE001 - unreadable: not a Megatron-LM checkpoint we can use
        return None
