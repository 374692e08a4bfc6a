"""Every recipe's model is the one its family's bridge reads from the released config.json.

A family's recipes.py holds a SIZES table of HF config fields; tests/data/hf_configs/
<size>.json is the config.json of the released checkpoint of that size (written
from its published shapes). Building a recipe's ModelConfig and converting the
release must agree on everything the bridge derives from HF config; what a recipe
chooses itself (layout, precision, training length) is not compared. Configs only:
no model is built.
"""

import dataclasses
import importlib
import json
import shutil
from pathlib import Path

import pytest

from megabridge.conversion.auto_bridge import _transformers_config
from megabridge.conversion.registry import bridge_for_family, bridges
from megabridge.models.config import ModelConfig
from megabridge.recipes import all_recipes

pytestmark = pytest.mark.unit

HF_CONFIGS = Path(__file__).parents[2] / "data" / "hf_configs"

# ModelConfig fields a recipe chooses, not the bridge: the parallel layout, precision,
# the layer implementation, recomputation, and the length it trains at (seq_length; the
# bridge's is max_position_embeddings, the longest the release was trained for).
RECIPE_CHOICES = {
    "seq_length",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "sequence_parallel",
    "bf16",
    "fp8",
    "first_last_layers_bf16",
    "num_layers_at_start_in_bf16",
    "num_layers_at_end_in_bf16",
    "recompute_swiglu",
    "recompute_cross_entropy",
    "recompute_modules",
    "transformer_impl",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "moe_router_dtype",
}
ARCHITECTURE = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in RECIPE_CHOICES]


def _family_sizes() -> dict[str, tuple[str, dict]]:
    """Every size of every family with a bridge: size name -> (family, HF fields)."""
    found = {}
    for family in sorted({b.family for b in bridges().values()}):
        module = importlib.import_module(f"megabridge.models.{family}.recipes")
        for name, size in module.SIZES.items():
            assert name not in found, f"size {name} is in two families' tables"
            found[name] = (family, size)
    return found


SIZES = _family_sizes()


def _released(size: str, tmp_path: Path) -> ModelConfig:
    """The ModelConfig the bridge reads from the released config.json, as conversion does."""
    path = HF_CONFIGS / f"{size}.json"
    assert path.is_file(), f"size {size} has no released config.json at {path}"
    folder = tmp_path / size
    folder.mkdir()
    shutil.copy(path, folder / "config.json")
    bridge = bridge_for_family(SIZES[size][0])
    # As AutoBridge reads it: a release under another model_type (kimi_k2) included.
    hf_config = _transformers_config(json.loads(path.read_text()), folder, bridge)
    return bridge.model_config(hf_config)


def _architecture(cfg: ModelConfig) -> dict:
    fields = {name: getattr(cfg, name) for name in ARCHITECTURE}
    rope = dict(fields["rope_scaling"])
    # Old config.json files name the RoPE type "type"; transformers adds "rope_type" too.
    if rope.get("type") == rope.get("rope_type"):
        rope.pop("type", None)
    fields["rope_scaling"] = rope
    return fields


def _size_of(recipe: str) -> str | None:
    """The size a recipe is named after (recipe names start with their size's name)."""
    matches = [s for s in SIZES if recipe.startswith(f"{s}_")]
    return max(matches, key=len) if matches else None


def test_every_size_has_its_released_config():
    expected = {f"{name}.json" for name in SIZES}
    present = {p.name for p in HF_CONFIGS.glob("*.json")}
    assert expected <= present, f"no config.json for {sorted(expected - present)}"
    assert present <= expected, f"config.json of no size: {sorted(present - expected)}"


def _released_recipes() -> list[str]:
    """Recipes of a released model: of a family with an HF bridge, and not a tiny test model."""
    families = {b.family for b in bridges().values()}
    return [name for name, recipe in sorted(all_recipes().items())
            if "_tiny_" not in name and recipe().model.family in families]  # fmt: skip


def test_released_recipes_are_found():
    assert len(_released_recipes()) >= 30  # the selection above cannot silently empty


@pytest.mark.parametrize("recipe", _released_recipes())
def test_recipe_model_is_the_released_architecture(recipe, tmp_path):
    model = all_recipes()[recipe]().model
    size = _size_of(recipe)
    assert size is not None, f"recipe {recipe} is named after no size of the SIZES tables"
    assert SIZES[size][0] == model.family, (recipe, size)
    released, built = _architecture(_released(size, tmp_path)), _architecture(model)
    differ = {k: (built[k], released[k]) for k in ARCHITECTURE if built[k] != released[k]}
    assert not differ, f"{recipe} (recipe, release): {differ}"


@pytest.mark.parametrize("size", sorted(SIZES))
def test_size_table_agrees_with_released_config_json(size):
    """Field by field, where the table and the release both name a field (the table may
    leave out what transformers' defaults give; the other test catches a wrong default)."""
    path = HF_CONFIGS / f"{size}.json"
    assert path.is_file(), f"size {size} has no released config.json at {path}"
    released = json.loads(path.read_text())
    table = SIZES[size][1]
    assert table, size
    _agree(size, table, released)


def _agree(size: str, table: dict, released: dict) -> None:
    for field, value in table.items():
        if field not in released:
            continue
        if field.endswith("_config") and isinstance(value, dict):  # a VLM's nested configs
            _agree(size, value, released[field])
        elif field == "rope_scaling":
            # Old files name the RoPE type "type"; transformers reads either.
            value, got = (
                {("rope_type" if k == "type" else k): v for k, v in d.items()}
                for d in (value, released[field])
            )
            assert value == got, (size, field)
        else:
            assert value == released[field], (size, field, value, released[field])
