import re

import pytest

from megabridge.errors import ConfigError
from megabridge.recipes import all_recipes, describe_recipe, get_recipe
from megabridge.training.config import ConfigContainer, apply_overrides, describe, validate

pytestmark = pytest.mark.unit


def test_overrides_are_typed():
    cfg = ConfigContainer()
    apply_overrides(
        cfg,
        [
            "train.train_iters=5",
            "optimizer.lr=3e-4",
            "model.tensor_model_parallel_size=2",
            "model.bf16=true",
            "checkpoint.save_interval=None",
            "peft.target_modules=q_proj,v_proj",
            'model.rope_scaling={"rope_type": "linear", "factor": 2.0}',
            "scheduler.lr_decay_style=linear",
        ],
    )
    assert cfg.train.train_iters == 5
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.tensor_model_parallel_size == 2
    assert cfg.model.bf16 is True
    assert cfg.checkpoint.save_interval is None
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.scheduler.lr_decay_style == "linear"


def test_unknown_key_suggests_closest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.train_itres'.*train.train_iters"
    ):
        apply_overrides(ConfigContainer(), ["train.train_itres=5"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.train_iters=abc", "expected int"),
        ("model.bf16=maybe", "expected bool or None"),
        ("scheduler.lr_decay_style=cubic", "one of 'cosine'"),
        ("model.rope_scaling=[1]", "JSON object"),
    ],
)
def test_wrong_type_names_key_and_type(override, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        apply_overrides(ConfigContainer(), [override])
    assert override.split("=")[0] in str(info.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(ConfigContainer(), ["train.train_iters"])


def test_validate_batch_sizes_and_parallel_layout():
    cfg = ConfigContainer()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 6, 4
    with pytest.raises(ConfigError, match="global_batch_size=6"):
        validate(cfg, world_size=1)
    cfg = ConfigContainer()
    cfg.model.tensor_model_parallel_size = 3
    with pytest.raises(ConfigError, match="num_query_groups=4 is not divisible"):
        validate(cfg, world_size=3)


def test_every_recipe_builds_a_valid_config():
    recipes = all_recipes()
    assert "vanilla_gpt_pretrain_config" in recipes
    for name, fn in recipes.items():
        cfg = fn()
        assert isinstance(cfg, ConfigContainer), name
        assert describe(cfg)


def test_unknown_recipe_lists_close_ones():
    with pytest.raises(ConfigError, match="did you mean vanilla_gpt_pretrain_config"):
        get_recipe("vanilla_gpt_pretrain")


_GPU_CLAIM = re.compile(r"\bon (one|\d+)\+? GPUs?\b")


def _gpus_needed(cfg: ConfigContainer) -> int:
    """The fewest processes the recipe's layout runs on (validate's divisibility rules)."""
    m = cfg.model
    model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size
    return model_parallel * (m.expert_model_parallel_size if m.num_moe_experts else 1)


def test_a_recipe_that_names_its_gpu_count_has_that_layout():
    checked = 0
    for name, fn in all_recipes().items():
        claim = _GPU_CLAIM.search(describe_recipe(name))
        if claim is None:
            continue
        said = 1 if claim[1] == "one" else int(claim[1])
        needed = _gpus_needed(fn())
        assert needed == said, f"{name} says {claim[0]!r} but its layout needs {needed}"
        checked += 1
    assert checked >= 10  # the check reads what the descriptions say


@pytest.mark.parametrize(
    "override, problem",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size=0 must be at least 1"),
        ("train.global_batch_size=-8", "train.global_batch_size=-8 must be at least 1"),
        (
            "train.train_iters=0",
            "train.train_iters=0 must be at least 1",
        ),  # would save random weights
        ("model.tensor_model_parallel_size=0", "tensor_model_parallel_size=0 must be a positive"),
        ("model.hidden_size=-64", "hidden_size=-64 must be a positive integer"),
        ("model.num_attention_heads=5", "hidden_size=64 is not divisible by num_attention_heads=5"),
    ],
)
def test_non_positive_or_non_dividing_sizes_are_one_line(override, problem):
    cfg = ConfigContainer()
    apply_overrides(cfg, [override])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    assert problem in str(err.value) and "\n" not in str(err.value), str(err.value)
