"""Tensor functions of the attention variants the torch spec (torch_layers.py) composes:
causal attention within fixed blocks (Llama 4's chunked attention), on padded batches and on
packed segments; the positions of packed tokens in their own segments; the weightless QK
norm and the position-dependent query temperature of Llama 4; the image blocks that attend
to themselves both ways (Gemma 3); bidirectional attention within segments (a vision tower's
windows and frames).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megabridge.errors import ConfigError


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hn] RMS-normalised over hn in fp32, without a weight, back in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def temperature_scales(positions: torch.Tensor, floor: int, scale: float) -> torch.Tensor:
    """1 + scale * log(1 + floor((p + 1) / floor)) per 0-based position p (fp32), as
    transformers' Llama 4 scales the queries of its NoPE layers."""
    steps = torch.floor((positions.float() + 1.0) / floor)
    return torch.log1p(steps) * scale + 1.0


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The 0-based position of every packed token in its own segment: [total] (long)."""
    cu = cu_seqlens.to(dtype=torch.long)
    if int(cu[-1]) != total:
        raise ConfigError(f"packed sequence: cu_seqlens ends at {int(cu[-1])}, not at {total}")
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


def split_segments(params, size: int):
    """Packed-sequence params whose segments are the ``size``-token blocks of the given ones
    (each block starting at its segment's start): chunked attention as plain per-segment
    causal attention, on the varlen kernel too."""
    bounds = params.cu_seqlens_q.tolist()
    cuts = [0]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        cuts += [*range(start + size, end, size), end] if end > start else []
    cu = torch.tensor(cuts, dtype=params.cu_seqlens_q.dtype, device=params.cu_seqlens_q.device)
    longest = max((b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)), default=0)
    return dataclasses.replace(
        params, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def attend_in_blocks(attend, q, k, v, size: int) -> torch.Tensor:
    """Causal attention within consecutive blocks of ``size`` tokens (Llama 4's chunked
    attention: query i sees key j iff j <= i and i // size == j // size), as one batched
    call of ``attend`` on the blocks. q [b, np, s, hn], k/v [b, ng, s, hn] -> [b, np, s, hn].

    The last block is padded at its end: causal attention never lets a real token see a pad.
    """
    b, s = q.shape[0], q.shape[2]
    pad = -s % size
    blocks = (s + pad) // size

    def split(t):  # [b, n, blocks * size, hn] -> [b * blocks, n, size, hn]
        t = F.pad(t, (0, 0, 0, pad)) if pad else t
        return t.unflatten(2, (blocks, size)).transpose(1, 2).flatten(0, 1)

    out = attend(split(q), split(k), split(v))  # [b * blocks, np, size, hn]
    return out.unflatten(0, (b, blocks)).transpose(1, 2).flatten(2, 3)[:, :, :s]


def segment_groups(bounds: list[int], device=None) -> list[tuple[int, torch.Tensor]]:
    """The segments [bounds[i], bounds[i + 1]) grouped by length: (length, token positions
    [segments, length]) per length, shortest first; empty segments left out. Built from host
    lists (no device sync), once per tower forward (vision_encoder.segments)."""
    by_length: dict[int, list[int]] = {}  # segment length -> the segments' starts
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            by_length.setdefault(b - a, []).append(a)
    return [
        (length, torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device))
        for length, starts in sorted(by_length.items())
    ]


def attend_in_segments(attend, q, k, v, groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Attention within each segment of q, k, v [s, n, hn] (a vision tower's windows or
    frames), ``groups`` from segment_groups: segments of one length go through ``attend``
    together, [segments, len, n, hn] -> the same, so a few calls cover the many windows of an
    image."""
    assert sum(rows.numel() for _, rows in groups) == q.shape[0], "segments must cover q"
    out = torch.empty_like(q)
    for _, rows in groups:
        rows = rows.to(q.device)
        out[rows.flatten()] = attend(q[rows], k[rows], v[rows]).flatten(0, 1)
    return out


def image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """Block ids [b, s] (long) of image tokens [b, s] (bool): each run of consecutive image
    tokens is one image, numbered from 0 along the sequence; -1 for text. As transformers'
    get_block_sequence_ids_for_mask (Gemma 3)."""
    previous = F.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, ids, torch.full_like(ids, -1))


def block_allowed(blocks: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[b, 1, c, kc]: query q_pos [c, 1] may see key k_pos [1, kc] when it is not later
    (causal) or both are tokens of one image (``blocks`` [b, s] from image_blocks)."""
    bq, bk = blocks[:, q_pos[:, 0]][:, :, None], blocks[:, k_pos[0]][:, None, :]
    return ((k_pos <= q_pos) | ((bq == bk) & (bq >= 0))).unsqueeze(1)
