"""Which transformer-layer implementation a model is built with.

* ``transformer_engine``: Megatron-Core's TE spec (fused kernels), when TE imports.
* ``torch``: megabridge's fast torch-native spec (models/torch_layers.py):
  SDPA attention and no s x s masks. The default without TE.
* ``local``: Megatron-Core's own unfused spec; the numerical reference.

All three give parameters the same names in checkpoints; ``local`` and ``torch``
also in memory, so conversion mappings are written once.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from megabridge.errors import ConfigError
from megabridge.models.config import ModelConfig, torch_only_fields

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def torch_only_features(cfg: ModelConfig) -> list[str]:
    """The model options that only the ``torch`` spec builds (fields marked torch_only)."""
    features = []
    for name in torch_only_fields():
        value, default = getattr(cfg, name), _DEFAULTS[name]
        if value != default:
            features.append(f"{name}={value}" if isinstance(default, str) else name)
    return features


def resolve_impl(cfg) -> str:
    impl = cfg.transformer_impl
    features = torch_only_features(cfg)
    if impl == "auto":
        return "transformer_engine" if have_transformer_engine() and not features else "torch"
    if impl != "torch" and features:
        raise ConfigError(
            f"model.transformer_impl={impl} cannot build {', '.join(features)}; "
            "use model.transformer_impl=torch (or auto)"
        )
    if impl == "transformer_engine" and not have_transformer_engine():
        raise ConfigError(
            "model.transformer_impl=transformer_engine but transformer_engine is not importable; "
            "use model.transformer_impl=torch"
        )
    return impl
