"""Pixtral's vision tower and the projectors behind it: Mistral 3's (RMSNorm, a learned
merge of each ``spatial_merge_size``^2 patch neighbourhood, linear - GELU - linear) and
LLaVA's (linear - GELU - linear: Pixtral-12B as transformers has it).

Pixtral (transformers' PixtralVisionModel): each image, at its own size (a multiple of the
patch), is cut into patches by a conv of stride patch; the patches of every image form one
sequence, RMSNorm-ed (``ln_pre``), then pre-norm layers (RMSNorm, attention without biases,
SiLU-gated MLP) in which each image's patches attend to each other only. Attention rotates
queries and keys by 2D RoPE: the head's first quarter of frequencies (the even-indexed ones
of a 1D RoPE over the head) turns with the patch's row, the second quarter (the odd-indexed
ones) with its column, rotated by halves over the whole head ([rows | cols | rows | cols]).

The layers are Megatron-Core TransformerLayers split over TP (models/vision_encoder.py: the
images are its segments, the angles its per-patch RoPE), ``blocks.N.`` in checkpoints
(conversion/vit.py ``pixtral_vit_layers``); the patch conv, ``ln_pre`` and the projector keep
transformers' names and are whole on every rank. Inputs are the image processor's:
``pixel_values`` [images, c, H, W] (each image zero-padded to the batch's largest) and
``image_sizes`` [images, 2] (each one's height and width in pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megabridge.conversion import vit
from megabridge.models import vision_encoder
from megabridge.models.llava.tower import ACTIVATIONS
from megabridge.models.vision_layers import VisionRMSNorm

EPS = 1e-5  # Pixtral's norms (fixed in transformers, not in the config)


def pixtral_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float):
    """RoPE angles [patches, head_dim] of patches at (``rows``, ``cols``): a 1D RoPE's
    head_dim / 2 frequencies, the even-indexed ones for the row, the odd-indexed for the
    column, then both halves again (rotate-half over the whole head), as transformers'
    PixtralVisionRotaryEmbedding."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    inv = inv.to(rows.device)
    half = torch.cat([rows[:, None].float() * inv[0::2], cols[:, None].float() * inv[1::2]], -1)
    return torch.cat([half, half], dim=-1)


class Projector(nn.Module):
    """Image features -> language-model embeddings. Mistral 3 (``merge``): RMSNorm, then
    each merge x merge neighbourhood of patches concatenated (as torch's unfold orders it:
    channel-major, rows then columns inside) and mapped back to the tower's width
    (``patch_merger.merging_layer``); then, for both, linear_1 - activation - linear_2."""

    def __init__(self, v: dict, merge: int | None):
        super().__init__()
        hidden, out, bias = v["hidden_size"], v["text_hidden_size"], v["multimodal_projector_bias"]
        self.merge = merge
        if merge:
            self.norm = VisionRMSNorm(hidden, eps=v["projector_norm_eps"])
            self.patch_merger = nn.Module()
            self.patch_merger.merging_layer = nn.Linear(hidden * merge**2, hidden, bias=False)
        self.linear_1 = nn.Linear(hidden, out, bias=bias)
        self.linear_2 = nn.Linear(out, out, bias=bias)
        self.act = ACTIVATIONS[v["projector_hidden_act"]]

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        # x [patches, hidden], each image's patches row-major on its (rows, cols) grid
        if self.merge:
            m, hidden = self.merge, x.shape[-1]
            x = self.norm(x)
            merged = []
            for image, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
                grid = image.view(h, w, hidden).permute(2, 0, 1).unsqueeze(0)  # [1, d, h, w]
                blocks = F.unfold(grid, kernel_size=m, stride=m)  # [1, d * m * m, tokens]
                merged.append(blocks.view(hidden * m * m, -1).t())
            x = self.patch_merger.merging_layer(torch.cat(merged))
        return self.linear_2(self.act(self.linear_1(x)))


class PixtralTower(MegatronModule):
    """Pixtral + a projector: pixel_values [images, c, H, W] and image_sizes [images, 2] ->
    features [image tokens, text hidden], the images' tokens one after another, each image's
    row-major (the order of its [IMG] tokens in the text)."""

    PROJECTION = ("multi_modal_projector.",)  # what model.freeze_vision_projection freezes
    MEGATRON_LAYERS = True  # built with the language model's TransformerConfig (runtime)

    def __init__(self, v: dict, lm_config, merge: int | None):
        hidden, heads = v["hidden_size"], v["num_attention_heads"]
        config = vision_encoder.tower_config(
            lm_config, depth=v["num_hidden_layers"], hidden=hidden, heads=heads,
            ffn=vit.padded_ffn(v["intermediate_size"]), activation=v["hidden_act"], gated=True,
            normalization="RMSNorm", eps=EPS, bias=False,
        )  # fmt: skip
        super().__init__(config=config)
        self.patch = v["patch_size"]
        self.patch_conv = nn.Conv2d(
            v["num_channels"], hidden, kernel_size=self.patch, stride=self.patch, bias=False
        )
        self.ln_pre = VisionRMSNorm(hidden, eps=EPS)
        self.blocks = vision_encoder.TowerLayers(config, "RMSNorm", v["intermediate_size"])
        self.multi_modal_projector = Projector(v, merge)
        self.head_dim, self.theta = hidden // heads, v["rope_theta"]
        # HF's hidden_states (the layers' input, then each layer's output) from either end
        self.feature_layer = v["vision_feature_layer"] % (v["num_hidden_layers"] + 1)

    def no_gradient(self) -> tuple[str, ...]:
        """The layers after the feature layer: its features never depend on them."""
        return tuple(f"blocks.{i}." for i in range(self.feature_layer, len(self.blocks)))

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        grids = [(int(h) // self.patch, int(w) // self.patch) for h, w in image_sizes.tolist()]
        embeds = self.patch_conv(pixel_values.to(self.patch_conv.weight.dtype))
        # each image's patches (its padding cut off), row-major: [patches, hidden]
        x = torch.cat(
            [e[:, :h, :w].flatten(1).t() for e, (h, w) in zip(embeds, grids, strict=True)]
        )
        x = self.ln_pre(x)
        rows = torch.cat([torch.arange(h).repeat_interleave(w) for h, w in grids]).to(x.device)
        cols = torch.cat([torch.arange(w).repeat(h) for h, w in grids]).to(x.device)
        angles = pixtral_angles(rows, cols, self.head_dim, self.theta)
        bounds = [0]
        for h, w in grids:
            bounds.append(bounds[-1] + h * w)
        images = vision_encoder.segments(bounds)  # each image attends to itself only
        for layer in list(self.blocks)[: self.feature_layer]:
            x = vision_encoder.run_layer(layer, x, images, angles)
        return self.multi_modal_projector(x, grids)


class Mistral3Vision(PixtralTower):
    """Mistral 3 (kind "mistral3"): Pixtral + norm, patch merger and linear-GELU-linear."""

    def __init__(self, v: dict, lm_config):
        super().__init__(v, lm_config, merge=v["spatial_merge_size"])


class PixtralLlavaVision(PixtralTower):
    """LLaVA with a Pixtral tower (kind "pixtral": Pixtral-12B): every patch a token."""

    def __init__(self, v: dict, lm_config):
        super().__init__(v, lm_config, merge=None)
