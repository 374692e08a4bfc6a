"""Qwen3-VL's vision tower (also Qwen3-VL-MoE's): pixel patches -> the
features that replace the image tokens, plus DeepStack's features for the first LM layers.

Differences from Qwen2.5-VL's tower (models/vision.py):

* LayerNorm (with bias) instead of RMSNorm, and a plain MLP (fc1, tanh-GELU, fc2) instead
  of a gated one; the patch embedding's Conv3d has a bias;
* a learned [side x side] position table (``pos_embed``), resampled bilinearly (corners
  aligned) to each image's patch grid and added to the patch embeddings, besides the 2D
  RoPE inside attention;
* no windows: every block attends over a whole frame;
* DeepStack: after block ``deepstack_visual_indexes[i]`` a merger of its own
  (``deepstack_merger_list.i``, LayerNorm after the 2 x 2 shuffle) turns the hidden states
  into features that are added to the image tokens' hidden states after LM layer i
  (models/vision.py ``VisionLanguageModel``).

The blocks are Megatron-Core layers (``blocks.N.self_attention.linear_qkv``, ...: the bridge
maps them through conversion/vit.py ``qwen3_vit_layers``); the rest keeps transformers'
names (``merger.norm``), mapped one to one. Patches arrive in the image processor's order: 2 x 2 merge
neighbourhoods row-major, rows and columns inside each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megabridge.conversion import vit
from megabridge.models import vision_encoder
from megabridge.models.vision_layers import (
    PatchEmbed,
    frame_bounds,
    patch_rows_cols,
    rope_inv_freq,
)


class Merger(nn.Module):
    """LayerNorm, then an exact-GELU MLP over each merge neighbourhood's concatenated patches.
    ``after_shuffle``: the norm spans the concatenation (DeepStack's mergers), else each
    patch (the final merger)."""

    def __init__(self, hidden: int, unit: int, out_hidden: int, after_shuffle: bool):
        super().__init__()
        merged = hidden * unit
        self.after_shuffle = after_shuffle
        self.norm = nn.LayerNorm(merged if after_shuffle else hidden, eps=1e-6)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, out_hidden)

    def forward(self, x):  # [patches, hidden] -> [patches / unit, out_hidden]
        merged = self.linear_fc1.in_features
        x = self.norm(x.reshape(-1, merged)) if self.after_shuffle else self.norm(x)
        return self.linear_fc2(F.gelu(self.linear_fc1(x.reshape(-1, merged))))


class Qwen3VisionTower(MegatronModule):
    """Pixel patches [patches, c*t*p*p] and their grids [images, 3] -> (features
    [tokens, out_hidden], DeepStack features: one [tokens, out_hidden] per fed LM layer).

    Its blocks are Megatron-Core TransformerLayers split over TP (models/vision_encoder.py);
    the patch embedding, position table and mergers are whole on every rank."""

    # what model.freeze_vision_projection freezes (models/vision.py freeze): the mergers
    PROJECTION = ("merger.", "deepstack_merger_list.")
    MEGATRON_LAYERS = True  # built with the language model's TransformerConfig (runtime)

    def __init__(self, v: dict, lm_config):
        hidden, heads = v["hidden_size"], v["num_heads"]
        config = vision_encoder.tower_config(
            lm_config, depth=v["depth"], hidden=hidden, heads=heads,
            ffn=vit.padded_ffn(v["intermediate_size"]), activation=v["hidden_act"], gated=False,
            normalization="LayerNorm", eps=1e-6,
        )  # fmt: skip
        super().__init__(config=config)
        self.merge = v["spatial_merge_size"]
        unit, out = self.merge**2, v["out_hidden_size"]
        self.patch_embed = PatchEmbed(
            v["in_channels"], v["temporal_patch_size"], v["patch_size"], hidden, bias=True
        )
        self.pos_embed = nn.Embedding(v["num_position_embeddings"], hidden)
        self.side = int(v["num_position_embeddings"] ** 0.5)
        self.blocks = vision_encoder.TowerLayers(config, "LayerNorm", v["intermediate_size"])
        self.merger = Merger(hidden, unit, out, after_shuffle=False)
        self.deepstack_indexes = list(v["deepstack_visual_indexes"])
        self.deepstack_merger_list = nn.ModuleList(
            Merger(hidden, unit, out, after_shuffle=True) for _ in self.deepstack_indexes
        )
        # 2D RoPE as Qwen2.5-VL's
        self.inv_freq = rope_inv_freq(hidden, heads, v.get("rope_theta", 10000.0))

    @property
    def deepstack_layers(self) -> int:
        """How many of the first LM layers take DeepStack features."""
        return len(self.deepstack_indexes)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor):
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        rows, cols = patch_rows_cols(grids, self.merge, pixels.device)
        x = self.patch_embed(pixels)
        x = x + self._positions(grids, rows, cols).to(x.dtype)
        inv = self.inv_freq.to(x.device)
        angles = torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)  # [patches, head_dim]
        frames = vision_encoder.segments(frame_bounds(grids), x.device)
        deepstack = []
        for i, layer in enumerate(self.blocks):
            x = vision_encoder.run_layer(layer, x, frames, angles)
            if i in self.deepstack_indexes:
                merger = self.deepstack_merger_list[self.deepstack_indexes.index(i)]
                deepstack.append(merger(x))
        return self.merger(x), deepstack

    def _positions(self, grids, rows, cols) -> torch.Tensor:
        """The learned position table resampled to each frame's h x w grid: bilinear, the
        table's corners on the grid's corners (transformers: align_corners=True), in fp32."""
        heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in grids]).to(rows.device)
        widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in grids]).to(rows.device)
        table = self.pos_embed.weight.float()
        out = 0
        for r, wr in self._taps(rows, heights):
            for c, wc in self._taps(cols, widths):
                out = out + table[r * self.side + c] * (wr * wc)[:, None]
        return out

    def _taps(self, index, size) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The two table entries along one axis that ``index`` (of ``size``) falls between,
        with their weights (the second is clamped to the table's edge at the last index)."""
        src = index.float() * (self.side - 1) / (size - 1).clamp(min=1)
        low = src.floor()
        frac = src - low
        high = (low + 1).clamp(max=self.side - 1)
        return [(low.long(), 1 - frac), (high.long(), frac)]
