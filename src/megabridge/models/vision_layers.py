"""The pieces Qwen's vision towers share (Qwen2.5-VL: models/vision.py; Qwen3-VL:
models/qwen3_vl/tower.py) besides their Megatron-Core layers (models/vision_encoder.py): the
Conv3d patch embedding, 2D RoPE's frequencies, and where each patch sits in its frame; and
the towers' RMSNorm (Qwen2.5-VL's merger, Pixtral: models/mistral3/tower.py)."""

from __future__ import annotations

import torch
from torch import nn


class VisionRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in fp32, then back to the input's dtype before the weight (as transformers)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, temporal: int, patch: int, hidden: int, bias: bool):
        super().__init__()
        self.shape = (-1, channels, temporal, patch, patch)
        kernel = (temporal, patch, patch)
        self.proj = nn.Conv3d(channels, hidden, kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # [patches, channels * temporal * patch * patch] -> [patches, hidden]
        x = pixels.to(self.proj.weight.dtype).view(self.shape)
        return self.proj(x).flatten(1)


def rope_inv_freq(hidden: int, heads: int, theta: float) -> torch.Tensor:
    """2D RoPE's frequencies: head_dim / 4 for the row, as many for the column."""
    half = hidden // heads // 2
    return 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)


def patch_rows_cols(grids, merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's (row, column) in its frame, patches in the image processor's order:
    ``merge`` x ``merge`` neighbourhoods row-major, rows and columns inside each."""
    rows, cols = [], []
    m = merge
    for t, h, w in grids:
        r = torch.arange(h).view(h // m, 1, m, 1).expand(h // m, w // m, m, m)
        c = torch.arange(w).view(1, w // m, 1, m).expand(h // m, w // m, m, m)
        rows.append(r.flatten().repeat(t))
        cols.append(c.flatten().repeat(t))
    return torch.cat(rows).to(device), torch.cat(cols).to(device)


def frame_bounds(grids) -> list[int]:
    """Cumulative patch counts at the end of every frame: each frame attends on its own."""
    bounds = [0]
    for t, h, w in grids:
        bounds += [bounds[-1] + h * w * (i + 1) for i in range(t)]
    return bounds
