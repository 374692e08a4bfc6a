"""Tiny HF models saved locally: a family's tiny config (megabridge.conversion.tiny), random weights.

For example ``save_tiny(tiny_config("llama", "tied_llama3_rope"), tmp_path / "hf")``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, norms included (ones would hide a missing norm mapping)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        # Saved buffers too (DeepSeek-V3's e_score_correction_bias): zeros would hide them.
        params = dict(model.named_parameters())
        for name, t in model.state_dict().items():
            if name not in params and t.is_floating_point():
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))


def save_tiny(
    config,
    path: Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: int | None = None,
) -> Path:
    """transformers' model of ``config`` with random weights, saved to ``path``.

    With ``max_shard_size`` (bytes) the weights are split into shards with an index.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(str(path), **shards)
    return Path(path)
