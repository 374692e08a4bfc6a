"""Datasets for the three kinds of runs, chosen by dataset.type.

* ``mock``: synthetic tokens (mock.py), the default.
* ``indexed``: Megatron-Core .bin/.idx prefixes, blended (indexed.py); make them
  with ``megabridge data preprocess`` (preprocess.py).
* ``sft``: JSONL chat or input/output examples (sft.py), packed or padded to
  the sequence length (packing.py); for a vision-language model, chat examples with
  images, rendered by its HF processor (vision_sft.py).

Every dataset answers ``len()`` and ``[i]`` with tokens, labels, loss_mask and
position_ids, and may bring its own ``collate``; batching.py decides which
samples each rank reads.
"""

from __future__ import annotations

from megabridge.errors import ConfigError
from megabridge.models.specs import resolve_impl
from megabridge.training.data import indexed, packing, sft, vision_sft
from megabridge.training.data.mock import MockDataset
from megabridge.training.data.tokenizer import tokenizer_for


def build(cfg):
    """(train dataset, validation dataset or None) for ``cfg``."""
    seq = cfg.dataset.seq_length or cfg.model.seq_length
    kind = cfg.dataset.type
    if kind == "mock":
        train = MockDataset(cfg.model.vocab_size, seq, cfg.rng.seed)
        valid = MockDataset(cfg.model.vocab_size, seq, cfg.rng.seed + 1)
        return train, valid
    if kind == "indexed":
        # Token ids need no tokenizer; an explicit one is still checked against the model.
        return indexed.build(cfg, seq, tokenizer_for(cfg) if cfg.tokenizer.path else None)
    if kind == "sft":
        return _build_sft(cfg, seq)
    raise ConfigError(f"dataset.type={kind!r} is not supported")


def validate_sft(cfg) -> None:
    """Packed SFT needs one packed sample per micro-batch and a THD-capable attention."""
    if not cfg.dataset.packed:
        return

    if cfg.train.micro_batch_size != 1:
        raise ConfigError(
            f"dataset.packed=true needs train.micro_batch_size=1 (got "
            f"{cfg.train.micro_batch_size}): a packed sample already holds several examples; "
            "or set dataset.packed=false"
        )
    if resolve_impl(cfg.model) == "local":
        raise ConfigError(
            "dataset.packed=true needs model.transformer_impl=torch or transformer_engine "
            "(megatron-core's local attention cannot keep packed examples apart)"
        )


def _build_sft(cfg, seq: int):
    if cfg.model.vision is not None:
        return vision_sft.build(cfg, seq)
    validate_sft(cfg)
    tokenizer = tokenizer_for(cfg, required_by="dataset.type=sft")
    train, valid = sft.load(cfg, tokenizer, seq)
    kind = packing.PackedSFTDataset if cfg.dataset.packed else packing.PaddedSFTDataset
    return kind(train, seq, cfg.rng.seed), (kind(valid, seq, cfg.rng.seed) if valid else None)
