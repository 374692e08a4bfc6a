"""HF architecture name -> family bridge, filled by one decorator per family."""

from __future__ import annotations

import importlib
import pkgutil

import megabridge.models as models_pkg
from megabridge.errors import UserError

_BRIDGES: dict[str, type] = {}


def register_bridge(cls: type) -> type:
    """Class decorator: make ``cls`` the bridge for each of its ``architectures``."""
    for arch in cls.architectures:
        if arch in _BRIDGES and _BRIDGES[arch] is not cls:
            raise RuntimeError(
                f"{arch} is registered twice ({_BRIDGES[arch].__name__}, {cls.__name__})"
            )
        _BRIDGES[arch] = cls
    return cls


def _import_families() -> None:
    for info in pkgutil.iter_modules(models_pkg.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"megabridge.models.{info.name}.bridge")
            except ModuleNotFoundError as e:
                if e.name != f"megabridge.models.{info.name}.bridge":
                    raise


def bridges() -> dict[str, type]:
    """Every registered architecture -> its bridge class."""
    _import_families()
    return dict(sorted(_BRIDGES.items()))


def bridge_for(architecture: str) -> type:
    table = bridges()
    if architecture not in table:
        raise UserError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(table)}"
        )
    return table[architecture]


def bridge_for_family(family: str) -> type:
    for cls in bridges().values():
        if cls.family == family:
            return cls
    families = sorted({c.family for c in bridges().values()})
    raise UserError(f"model family {family!r} has no HF bridge; families: {', '.join(families)}")
