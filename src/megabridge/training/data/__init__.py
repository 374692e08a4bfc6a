"""Datasets for the three kinds of runs, chosen by dataset.type."""

from __future__ import annotations

from megabridge.errors import ConfigError


def build(cfg):
    """(train dataset, validation dataset or None) for ``cfg``."""
    seq = cfg.dataset.seq_length or cfg.model.seq_length
    kind = cfg.dataset.type
    if kind == "mock":
        from megabridge.training.data.mock import MockDataset

        train = MockDataset(cfg.model.vocab_size, seq, cfg.rng.seed)
        valid = MockDataset(cfg.model.vocab_size, seq, cfg.rng.seed + 1)
        return train, valid
    raise ConfigError(f"dataset.type={kind!r} is not supported yet")
