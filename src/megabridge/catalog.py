"""What megabridge supports, listed without importing torch: ``megabridge models`` and
``megabridge recipes`` answer at once.

The family folders stay the one source of truth. Families are their bridge classes
(registry.bridges(); the bridge modules and what they import are torch-free). Recipes
are read from each ``models/<family>/recipes.py`` as source: a recipe's module builds
configs with torch-importing helpers, so the names and first docstring lines are taken
from the syntax tree instead. tests/unit_tests/test_cli_startup.py checks that this
listing and recipes.all_recipes() agree.
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path

import megabridge.models as models_pkg
from megabridge.conversion import registry
from megabridge.errors import ConfigError

DEFAULT_RECIPE = "vanilla_gpt_pretrain_config"


def families() -> list[dict]:
    """One entry per family: its HF architectures, parallelisms and notes."""
    return [cls.describe() for cls in dict.fromkeys(registry.bridges().values())]


def recipes() -> dict[str, str]:
    """Every recipe name -> the first line of its docstring, as recipes.all_recipes() finds
    them (public ``*_config`` functions defined in a family's recipes.py), sorted."""
    found: dict[str, str] = {}
    for path in sorted(Path(models_pkg.__path__[0]).glob("*/recipes.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_config"):
                doc = ast.get_docstring(node) or ""
                found[node.name] = doc.splitlines()[0] if doc else ""
    return dict(sorted(found.items()))


def check_recipe(name: str) -> None:
    """Raise a ConfigError naming the closest recipes when ``name`` is not one."""
    known = recipes()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown recipe {name!r}{hint} (`megabridge recipes` lists all {len(known)})"
        )


def markdown_table(listed: list[dict]) -> str:
    lines = ["| family | HF architectures | parallelism | notes |", "|---|---|---|---|"]
    for f in listed:
        archs = ", ".join(f"`{a}`" for a in f["architectures"])
        lines.append(f"| {f['family']} | {archs} | {', '.join(f['parallelism'])} | {f['notes']} |")
    return "\n".join(lines)


def cmd_models(args) -> int:
    listed = families()
    if args.markdown:
        print(markdown_table(listed))
        return 0
    for f in listed:
        archs, layout = ", ".join(f["architectures"]), "/".join(f["parallelism"])
        print(f"{f['family']:12s} {archs:45s} {layout:10s} {f['notes']}")
    return 0


def cmd_recipes(args) -> int:
    for name, line in recipes().items():
        print(f"{name:40s} {line}")
    return 0
