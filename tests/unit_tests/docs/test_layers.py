"""Imports run one way: each module imports only its own layer and the layers below.

The layers, bottom to top (CONTRIBUTING.md draws them):

0. the model config: errors.py, models/config.py; progress.py (progress lines)
1. the conversion machinery: mappings, the family base, safetensors IO, sharding,
   streaming, the family registry; runtime.py (process groups, the CPU backend);
   outputs.py (locked, staged output folders), checksums.py (file checksums)
2. the family folders (bridge.py) and the model builder: models/provider.py, specs,
   torch_layers, ...
3. the public entry points (AutoBridge, the convert / verify commands, weight sync, the CLI,
   its torch-free listings catalog.py and doctor.py, the commands' path checks
   command_paths.py) and training: training/, peft/,
   recipes.py and each family's recipes.py (training configs)

A module imports megabridge at module level; the CLI alone imports its commands
inside functions, so that ``megabridge --help`` does not load torch and Megatron, and
doctor.py its torch probe (``--probe``).
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[3] / "src"
LAYER_NAMES = ("model config", "conversion machinery", "families and builder", "entry points")
ENTRY_POINTS = {"auto_bridge", "commands", "sync_plan", "verify", "weight_sync"}
LAZY_IMPORTS_ALLOWED = {"megabridge.cli", "megabridge.doctor"}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if module in (
        "megabridge",
        "megabridge.errors",
        "megabridge.models",
        "megabridge.models.config",
        "megabridge.progress",
    ):
        return 0
    if module in ("megabridge.runtime", "megabridge.outputs", "megabridge.checksums"):
        return 1
    if parts[1] == "conversion":
        return 3 if len(parts) > 2 and parts[2] in ENTRY_POINTS else 1
    if parts[1] == "models":
        return 3 if parts[-1] == "recipes" else 2
    if parts[1] in (
        "training",
        "peft",
        "cli",
        "__main__",
        "recipes",
        "catalog",
        "doctor",
        "command_paths",
    ):
        return 3
    raise AssertionError(f"{module} is in no layer: add it to tests/unit_tests/docs/test_layers.py")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "megabridge").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imports(path: Path):
    """(imported megabridge module, line, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from megabridge.models import rope` imports the module megabridge.models.rope
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "megabridge":
                yield name, node.lineno, id(node) in top_level


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_layer_imports_a_higher_one():
    upward = [
        f"{module}:{line} ({LAYER_NAMES[layer_of(module)]}) imports {name} "
        f"({LAYER_NAMES[layer_of(name)]})"
        for module, path in MODULES.items()
        for name, line, _ in _imports(path)
        if layer_of(name) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_megabridge_modules_are_imported_at_module_level():
    hidden = [
        f"{module}:{line} imports {name} inside a function"
        for module, path in MODULES.items()
        if module not in LAZY_IMPORTS_ALLOWED
        for name, line, top_level in _imports(path)
        if not top_level
    ]
    assert not hidden, "\n".join(hidden)
