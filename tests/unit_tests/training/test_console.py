"""The start-of-run console: a short aligned summary and only the non-default settings."""

import pytest

from megabridge.recipes import get_recipe
from megabridge.training import console
from megabridge.training.config import apply_overrides

pytestmark = pytest.mark.unit


def test_non_defaults_are_what_the_recipe_and_overrides_changed():
    cfg = get_recipe("llama_tiny_pretrain_config")
    apply_overrides(cfg, ["optimizer.lr=0.005", "model.recompute_granularity=full"])
    changed = dict(console.non_defaults(cfg))
    assert changed["optimizer.lr"] == "0.005"
    assert changed["model.recompute_granularity"] == "full"
    # unchanged defaults, the architecture and what the summary shows stay out
    assert "optimizer.adam_eps" not in changed and "rng.seed" not in changed
    assert not [k for k in changed if k in ("model.hidden_size", "model.num_layers")]
    assert "train.train_iters" not in changed


def test_summary_rows():
    cfg = get_recipe("llama_tiny_pretrain_config")
    apply_overrides(cfg, ["checkpoint.save_interval=5"])
    rows = dict(console.summary(cfg, (1_234_567, 1_234_567), "runs/x/ck", "runs/x/logs"))
    assert rows["model"] == "llama, 1.23M parameters"
    assert rows["layout"] == "TP=1 PP=1 EP=1 DP=1 (1 process)"
    assert rows["batch"] == "8 sequences = micro 4 x 2 accumulation x DP 1"
    assert rows["sequence"].startswith("128 tokens")
    assert rows["checkpoints"] == "runs/x/ck (every 5 and at the end)"
    apply_overrides(cfg, ["checkpoint.save_at_end=false"])
    rows = dict(console.summary(cfg, (1, 1), "ck", "l"))
    assert rows["checkpoints"] == "ck (every 5)"
    apply_overrides(cfg, ["checkpoint.save_interval=None"])
    rows = dict(console.summary(cfg, (1, 1), "ck", "l"))
    assert rows["checkpoints"].startswith("ck (none: checkpoint.save_at_end=false")
    lora = dict(console.summary(cfg, (1_000_000, 2_000), "c", "l"))["model"]
    assert "2K trainable" in lora


def test_start_of_run_text_is_aligned():
    cfg = get_recipe("llama_tiny_pretrain_config")
    text = console.start_of_run(cfg, (10, 10), "c", "l")
    lines = text.splitlines()
    summary = lines[: lines.index("settings that differ from the defaults:")]
    columns = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in summary}
    assert len(columns) == 1, text  # every value starts in the same column
    assert len(text) < 1500, text  # short: the full config is in config.json
