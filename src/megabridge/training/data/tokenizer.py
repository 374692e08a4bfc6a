"""The HF tokenizer a run reads its text with: found, loaded offline, checked against the model."""

from __future__ import annotations

import logging
from pathlib import Path

from megabridge.errors import ConfigError, UserError

log = logging.getLogger(__name__)


def tokenizer_path(cfg) -> str | None:
    """tokenizer.path, else checkpoint.pretrained_checkpoint when that is an HF model folder."""
    if cfg.tokenizer.path:
        return cfg.tokenizer.path
    pretrained = cfg.checkpoint.pretrained_checkpoint
    if pretrained and (Path(pretrained) / "config.json").is_file():
        return pretrained
    return None


def load_tokenizer(path: str | Path, what: str = "tokenizer.path"):
    """transformers.AutoTokenizer from a local folder; never touches the network."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{what}={path}: no such folder (expected an HF tokenizer folder)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}={path}: cannot load a tokenizer: {reason}") from None


def tokenizer_for(cfg, required_by: str | None = None):
    """The run's tokenizer, checked to fit model.vocab_size; None when there is none.

    ``required_by`` names what needs it (e.g. "dataset.type=sft"): then a missing
    tokenizer is a ConfigError instead of None.
    """
    path = tokenizer_path(cfg)
    if path is None:
        if required_by:
            raise ConfigError(
                f"{required_by} needs a tokenizer: set tokenizer.path=HF_FOLDER "
                "(or checkpoint.pretrained_checkpoint to an HF model folder)"
            )
        return None
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size={len(tokenizer)} (or more)"
        )
    return tokenizer
