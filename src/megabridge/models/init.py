"""Weight initialisation that does not depend on the parallel layout.

Megatron-Core initialises each rank's shard from that rank's RNG stream, so a
model trained at TP=2 or PP=2 starts from other weights than at TP=1. Here each
parameter is drawn whole from a generator seeded by (seed, its global name) and
then split for this rank: every layout starts from the same model, and the same
seed reproduces a run at any TP/PP/EP.
"""

from __future__ import annotations

import math
import zlib

import torch

from megabridge.conversion import sharding, vit

# Megatron-Core's scaled init for the layers that write into the residual stream.
_OUTPUT_LAYERS = (".linear_proj.weight", ".linear_fc2.weight")


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


def _full_init(name: str, shape: torch.Size, cfg, seed: int, device) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1:  # norm weights
        fill = 0.0 if cfg.layernorm_zero_centered_gamma else 1.0
        return torch.full(shape, fill, device=device)
    std = cfg.init_method_std
    if name.endswith(_OUTPUT_LAYERS):
        std = std / math.sqrt(2.0 * cfg.num_layers)
    gen = torch.Generator(device=device).manual_seed(_seed(seed, name))
    return torch.randn(shape, generator=gen, device=device) * std


def _zero_tower_padding(name: str, full: torch.Tensor, cfg) -> None:
    """A vision tower's MLP is padded to vit.padded_ffn units (models/vision_encoder.py): its
    extra units (rows of fc1, [gate; up] halves each, columns of fc2) start at zero, so they
    add nothing, as in a converted checkpoint."""
    if not name.startswith("vision.") or ".mlp.linear_fc" not in name:
        return
    ffn = cfg.vision["intermediate_size"]
    padded = vit.padded_ffn(ffn)
    if ".mlp.linear_fc1." in name:  # [padded or 2 * padded (gated), ...]
        full.view(-1, padded, *full.shape[1:])[:, ffn:] = 0
    elif name.endswith(".mlp.linear_fc2.weight"):  # [hidden, padded]
        full[:, ffn:] = 0


@torch.no_grad()
def initialize(model_chunks: list[torch.nn.Module], cfg, seed: int) -> None:
    """Fill every parameter of this rank from its layout-independent draw."""
    import torch.distributed as dist

    for chunk in model_chunks:
        for local_name, param in chunk.named_parameters():
            # Experts are split over the expert-TP group (which may differ from TP), and
            # named by their global index, so every EP layout draws the same experts.
            group = sharding.tensor_parallel_group(local_name)
            tp_rank, tp_size = dist.get_rank(group), dist.get_world_size(group)
            name = sharding.global_name(chunk, local_name)
            if name == "output_layer.weight" and cfg.share_embeddings_and_output_weights:
                name = "embedding.word_embeddings.weight"  # the tied copy on the last stage
            how = sharding.param_split(local_name, param, cfg.gated)
            full_shape = list(param.shape)
            if how in ("dim0", "gated_dim0"):
                full_shape[0] *= tp_size
            elif how == "dim1":
                full_shape[1] *= tp_size
            full = _full_init(name, torch.Size(full_shape), cfg, seed, param.device)
            _zero_tower_padding(name, full, cfg)
            param.copy_(sharding.split(full, how, tp_rank, tp_size))
