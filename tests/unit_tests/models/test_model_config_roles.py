"""The roles of ModelConfig's fields (models/config.py) against the models they build.

A field that changes the parameter set must be an architecture field: the
resume check and the pretrained-override rule are derived from the roles.
"""

import dataclasses
import json
import types
import typing

import pytest

from megabridge.errors import CheckpointError, ConfigError
from megabridge.models.config import (
    ARCHITECTURE,
    LAYOUT,
    RUNTIME,
    ModelConfig,
    architecture,
    copy_architecture,
    fields_with_role,
)
from megabridge.models.provider import build_model
from megabridge.models.specs import resolve_impl
from megabridge.training import checkpointing

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]

_HINTS = typing.get_type_hints(ModelConfig)

# Values the generic rule below would get wrong (a choice that cannot build here,
# or a value megatron-core refuses on its own).
_OTHER_VALUES = {
    "transformer_impl": "local",  # transformer_engine is not installed on a CPU box
    "recompute_granularity": "selective",  # "full" needs recompute_method too
    "recompute_modules": ["layernorm"],
}


def _base() -> ModelConfig:
    """Small, but with a dense and an MoE layer and GQA, so MoE and attention fields matter."""
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=96,
        seq_length=16,
        num_moe_experts=4,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=16,
        moe_layer_freq=[0, 1],
        moe_router_score_function="sigmoid",  # what moe_router_enable_expert_bias needs
        transformer_impl="torch",
        bf16=False,
    )


def _other_value(name: str, value):
    """A valid value of field ``name`` other than ``value``."""
    if name in _OTHER_VALUES:
        return _OTHER_VALUES[name]
    tp = _HINTS[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return {bool: True, int: 1, float: 0.5}.get(tp) or typing.get_args(tp)[0]
    if tp is bool:
        return not value
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != value)
    if tp is int:
        return value * 2
    if tp is float:
        return value * 2 if value else 0.1
    raise AssertionError(f"no alternative value for {name}: {tp}; add it to _OTHER_VALUES")


def _parameter_set(cfg: ModelConfig) -> set[tuple[str, tuple]]:
    """(name, shape) of everything a checkpoint holds: parameters and persistent buffers."""
    (model,) = build_model(cfg, meta=True)
    return {(name, tuple(t.shape)) for name, t in model.state_dict().items() if hasattr(t, "shape")}


def _changed(name: str) -> ModelConfig:
    cfg = _base()
    setattr(cfg, name, _other_value(name, getattr(cfg, name)))
    return cfg


def test_every_field_declares_one_of_three_roles():
    roles = {f.name: f.metadata.get("role") for f in dataclasses.fields(ModelConfig)}
    assert set(roles.values()) == {ARCHITECTURE, RUNTIME, LAYOUT}
    assert set(fields_with_role(LAYOUT)) == {
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "sequence_parallel",
    }


@pytest.mark.parametrize("name", fields_with_role(RUNTIME))
def test_a_runtime_field_leaves_the_parameter_set_alone(name):
    # Layout fields are left out: they split the parameters over processes by design
    # (one process cannot build TP=2), and checkpoints load at any layout.
    assert _parameter_set(_changed(name)) == _parameter_set(_base())


@pytest.mark.parametrize(
    "name",
    [
        "num_query_groups",
        "hidden_size",
        "norm_placement",
        "qk_norm_across_heads",
        "moe_router_enable_expert_bias",
        "moe_shared_expert_gate",
    ],
)
def test_an_architecture_field_can_change_the_parameter_set(name):
    # Proves the comparison above can fail: these change what the checkpoint holds.
    assert name in fields_with_role(ARCHITECTURE)
    assert _parameter_set(_changed(name)) != _parameter_set(_base())


def test_a_resume_check_sees_the_fields_that_were_missing():
    for name in ("norm_placement", "qk_norm_across_heads", "moe_router_enable_expert_bias"):
        assert architecture(_changed(name)) != architecture(_base()), name


@pytest.mark.parametrize(
    "name", ["norm_placement", "qk_norm_across_heads", "moe_router_enable_expert_bias"]
)
def test_a_resume_into_another_model_stops_at_the_architecture_check(name, tmp_path):
    saved = _base()
    (tmp_path / checkpointing.METADATA).write_text(json.dumps({"model": architecture(saved)}))
    assert checkpointing.check_architecture(tmp_path, _base())  # same model, other run: fine
    with pytest.raises(CheckpointError, match=f"made for another model \\({name}: checkpoint"):
        checkpointing.check_architecture(tmp_path, _changed(name))
    relaid = _base()
    relaid.tensor_model_parallel_size, relaid.hidden_dropout = 2, 0.1
    assert checkpointing.check_architecture(tmp_path, relaid)  # layout and runtime may change


def test_a_pretrained_model_sets_the_architecture_but_not_the_run():
    source, target = _changed("norm_placement"), _base()
    source.hidden_dropout, source.tensor_model_parallel_size = 0.3, 4
    copy_architecture(source, target)
    assert target.norm_placement == source.norm_placement
    assert (target.hidden_dropout, target.tensor_model_parallel_size) == (0.0, 1)


def test_torch_only_fields_keep_their_error_message():
    cfg = _base()
    cfg.transformer_impl, cfg.norm_placement, cfg.sliding_window = "local", "post", 8
    with pytest.raises(ConfigError, match=r"cannot build norm_placement=post, sliding_window;"):
        resolve_impl(cfg)
