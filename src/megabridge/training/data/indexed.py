"""Pretraining on Megatron-Core indexed datasets (.bin/.idx from ``megabridge data preprocess``).

dataset.blend names one or several prefixes, optionally weighted
(``0.3,data/a,0.7,data/b``); dataset.split divides each prefix's documents into
train, validation and test. Megatron-Core's BlendedMegatronDatasetBuilder and
GPTDataset do the work: documents concatenated and cut into samples of
seq_length + 1 tokens, shuffled with rng.seed, blended by weight. Their sample
indices are cached in ``<prefix>/cache/`` (Megatron's default) and reused by
later runs with the same settings.

No tokenizer is needed: samples are token ids already. GPTDataset asks its
tokenizer only for the vocabulary size and the EOD and pad ids; the EOD id is
used only to reset positions or masks at document ends (off here) and the pad id
only to pad and mask short samples, which pretraining data never has.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megabridge.errors import ConfigError

# The test split is held out of training but never read: its indices are not built.
_TEST = 2
_SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class _NoBlendCacheNote(logging.Filter):
    # Blend indices are cheap to rebuild, so they are kept in memory (path_to_cache
    # None); Megatron warns about that on every run.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Cannot save the BlendedDataset indexes" not in record.getMessage()


logging.getLogger("megatron.core.datasets.blended_dataset").addFilter(_NoBlendCacheNote())


class TokenIds:
    """The little GPTDataset reads from a tokenizer, for data that is already token ids."""

    pad = -1  # matches no real token id, so no token of the data is ever masked

    def __init__(self, vocab_size: int, eod: int | None = None):
        self.vocab_size = vocab_size
        self.eod = eod
        # part of the key of Megatron's index cache (datasets record their config in it)
        self.unique_identifiers = {"class": "TokenIds", "vocab_size": vocab_size, "eod": eod}


class Samples:
    """A GPTDataset or BlendedDataset, answering with the keys forward_step reads."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        return {key: sample[key] for key in _SAMPLE_KEYS}


def parse_blend(blend: list[str]) -> tuple[list[str], list[float] | None]:
    """'prefix' or 'p1,p2' (weighted by size) or 'w1,p1,w2,p2' -> (absolute prefixes, weights)."""
    if not blend:
        raise ConfigError(
            "dataset.type=indexed needs dataset.blend=PREFIX (or 'w1,prefix1,w2,prefix2'), "
            "the output of `megabridge data preprocess`"
        )
    weights: list[float] | None = None
    prefixes = blend
    if len(blend) % 2 == 0:
        try:
            weights = [float(w) for w in blend[0::2]]
            prefixes = blend[1::2]
        except ValueError:
            weights = None
    if weights is not None and any(w <= 0 for w in weights):
        raise ConfigError(f"dataset.blend={','.join(blend)}: weights must be positive")
    for prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
        if missing:
            raise ConfigError(
                f"dataset.blend: {prefix}{' and '.join(missing)} not found "
                "(expected the PREFIX of `megabridge data preprocess --output-prefix PREFIX`)"
            )
    return [str(Path(p).resolve()) for p in prefixes], weights


def _check_split_sizes(prefixes: list[str], split_matrix: list, split: str) -> None:
    """Every used split of every prefix must hold tokens (an empty one never ends building)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        dataset = IndexedDataset(prefix)  # keep it alive: its arrays are views of its mmap
        lengths = dataset.sequence_lengths
        n = len(lengths)
        for name, bounds in zip(("train", "validation"), split_matrix[:_TEST], strict=True):
            if bounds is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if int(lengths[beg:end].sum()) == 0:
                raise ConfigError(
                    f"dataset.split={split}: the {name} split of {prefix} ({n} documents) is "
                    f"empty; use more documents or another split (e.g. 90,10,0)"
                )


def build(cfg, seq_length: int, tokenizer=None) -> tuple[Samples, Samples | None]:
    """(train, validation or None) samples for dataset.type=indexed."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(cfg.dataset.blend)
    eod = tokenizer.eos_token_id if tokenizer is not None else None
    try:
        config = GPTDatasetConfig(
            random_seed=cfg.rng.seed,
            sequence_length=seq_length,
            blend=(prefixes, weights),
            split=cfg.dataset.split,
            tokenizer=TokenIds(cfg.model.vocab_size, eod),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,  # attention is causal by itself; no s x s mask
        )
    except (AssertionError, ValueError):
        raise ConfigError(
            f"dataset.split={cfg.dataset.split!r}: expected up to three non-negative weights "
            "'train,valid,test', e.g. 969,30,1"
        ) from None
    if config.split_matrix[0] is None:
        raise ConfigError(f"dataset.split={cfg.dataset.split}: the train weight must be > 0")
    config.split_matrix[_TEST] = None
    _check_split_sizes(prefixes, config.split_matrix, cfg.dataset.split)
    t = cfg.train
    sizes = [max(t.train_iters, 1) * t.global_batch_size, t.eval_iters * t.global_batch_size, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return Samples(train), (Samples(valid) if valid is not None else None)
