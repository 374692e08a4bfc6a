"""The recipe registry: every ``*_config`` function in ``megabridge.models.<family>.recipes``.

A family's recipes are found by looking, not by being listed here: adding a
family folder with a recipes.py adds its recipes.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable

from megabridge.errors import ConfigError
from megabridge.training.config import ConfigContainer

DEFAULT_RECIPE = "vanilla_gpt_pretrain_config"


def all_recipes() -> dict[str, Callable[[], ConfigContainer]]:
    import megabridge.models as models_pkg

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
    recipes = all_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, recipes, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown recipe {name!r}{hint} (`megabridge recipes` lists all {len(recipes)})"
        )
    return recipes[name]()


def describe_recipe(name: str) -> str:
    doc = inspect.getdoc(all_recipes()[name]) or ""
    return doc.splitlines()[0] if doc else ""
