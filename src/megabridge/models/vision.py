"""Vision-language models: a vision tower in front of Megatron-Core's GPTModel.

``VisionLanguageModel`` is a GPTModel whose first pipeline stage also holds a vision
tower (``vision``). The tower turns an image's patches into features; they replace the
image placeholder tokens' embeddings, and the language model runs on the result
(``decoder_input``), with M-RoPE (three position rows: temporal, height, width) where
the family asks for it. The language model's parameters keep GPTModel's names, so the
text families' mappings, sharding and checkpoints apply unchanged; the tower's are
under ``vision.``.

The tower is a plain torch module, replicated on every tensor-parallel rank (not split):
``ModelConfig.vision`` describes it, ``TOWERS`` builds it by ``vision["kind"]`` (LLaVA's
and Gemma 3's CLIP / SigLIP towers: models/llava/tower.py). With
``bidirectional_image_attention`` (Gemma 3) every stage passes the image tokens' block ids
as the attention mask, and the torch spec lets each image's tokens see each other.

Qwen2.5-VL's tower (``Qwen25VisionTower``): a Conv3d patch embedding, pre-norm blocks
(RMSNorm, fused-qkv attention with biases, SiLU-gated MLP with biases) with 2D RoPE
over (row, column) of each patch, attention inside windows of
``window_size // patch_size`` patches square except in ``fullatt_block_indexes``, and a
patch merger (RMSNorm, then an MLP over each ``spatial_merge_size``^2 neighbourhood).
Patches arrive grouped by merge neighbourhood (the image processor's order); the
blocks see them regrouped by window, and the merger's output goes back to the
processor's order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from torch import nn

from megabridge.errors import UserError
from megabridge.models.attention_ops import image_blocks
from megabridge.models.llava import tower
from megabridge.models.qwen3_vl.tower import Qwen3VisionTower
from megabridge.models.vision_layers import (
    PatchEmbed,
    VisionAttention,
    frame_bounds,
    patch_rows_cols,
    rope_inv_freq,
)

_ACTIVATIONS = {"silu": F.silu}  # the vision MLPs' hidden_act (the bridge refuses others)


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


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=True)
        self.up_proj = nn.Linear(hidden, ffn, bias=True)
        self.down_proj = nn.Linear(ffn, hidden, bias=True)
        self.act = _ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, act: str):
        super().__init__()
        self.norm1 = VisionRMSNorm(hidden)
        self.norm2 = VisionRMSNorm(hidden)
        self.attn = VisionAttention(hidden, heads)
        self.mlp = VisionMLP(hidden, ffn, act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, hidden: int, unit: int, out_hidden: int):
        super().__init__()
        self.ln_q = VisionRMSNorm(hidden)
        merged = hidden * unit
        # indices 0 and 2, as in the HF checkpoint (mlp.0, mlp.2)
        self.mlp = nn.Sequential(
            nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, out_hidden)
        )

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class Qwen25VisionTower(nn.Module):
    """Qwen2.5-VL's windowed ViT: pixel patches [patches, c*t*p*p] -> features [tokens, out]."""

    PROJECTION = ("merger.",)  # what model.freeze_vision_projection freezes (freeze())

    def __init__(self, v: dict):
        super().__init__()
        hidden, heads = v["hidden_size"], v["num_heads"]
        self.merge = v["spatial_merge_size"]
        self.full_blocks = set(v["fullatt_block_indexes"])
        # window side in merged tokens
        self.window = v["window_size"] // self.merge // v["patch_size"]
        self.patch_embed = PatchEmbed(
            v["in_channels"], v["temporal_patch_size"], v["patch_size"], hidden, bias=False
        )
        self.blocks = nn.ModuleList(
            VisionBlock(hidden, heads, v["intermediate_size"], v["hidden_act"])
            for _ in range(v["depth"])
        )
        self.merger = PatchMerger(hidden, self.merge**2, v["out_hidden_size"])
        # 2D RoPE, rotated by halves over the whole head (angles [rows | columns | rows | columns])
        self.inv_freq = rope_inv_freq(hidden, heads, v.get("rope_theta", 10000.0))

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
        unit = self.merge**2
        order, windows = self._windows(grids)  # merged-token order by window
        x = self.patch_embed(pixels)
        n = x.shape[0]
        x = x.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        angles = self._angles(grids, x.device)  # [patches, head_dim / 2]
        angles = angles.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [patches, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        images = frame_bounds(grids)
        for i, block in enumerate(self.blocks):
            x = block(x, images if i in self.full_blocks else windows, cos, sin)
        return self.merger(x)[torch.argsort(order)]

    def _angles(self, grids, device) -> torch.Tensor:
        """RoPE angles of each patch from its (row, column), patches in the processor's order."""
        r, c = patch_rows_cols(grids, self.merge, device)
        inv = self.inv_freq.to(device)
        return torch.cat([r[:, None].float() * inv, c[:, None].float() * inv], dim=-1)

    def _windows(self, grids) -> tuple[torch.Tensor, list[int]]:
        """Merged tokens ordered window by window (row-major windows, row-major inside),
        and the windows' patch boundaries (cumulative)."""
        order, bounds, offset = [], [0], 0
        side, unit = self.window, self.merge**2
        for t, h, w in grids:
            gh, gw = h // self.merge, w // self.merge
            index = torch.arange(t * gh * gw).view(t, gh, gw) + offset
            for frame in index:
                for r0 in range(0, gh, side):
                    for c0 in range(0, gw, side):
                        window = frame[r0 : r0 + side, c0 : c0 + side].flatten()
                        order.append(window)
                        bounds.append(bounds[-1] + window.numel() * unit)
            offset += t * gh * gw
        return torch.cat(order), bounds


TOWERS = {
    "qwen2_5_vl": Qwen25VisionTower,
    "qwen3_vl": Qwen3VisionTower,
    "llava": tower.LlavaVision,  # CLIP / SigLIP + LLaVA's projector (models/llava/tower.py)
    "gemma3": tower.Gemma3Vision,  # SigLIP + Gemma 3's pooling projector
}


class VisionLanguageModel(GPTModel):
    """GPTModel plus a vision tower on the first pipeline stage (see the module docstring)."""

    def __init__(self, *args, vision: dict, bidirectional_images: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_token_id = vision["image_token_id"]
        self.vision = TOWERS[vision["kind"]](vision) if self.pre_process else None
        self.bidirectional_images = (
            bidirectional_images  # ModelConfig.bidirectional_image_attention
        )
        # DeepStack (Qwen3-VL): a tower that also returns features for the first LM layers
        self._deepstack = None  # (image positions [b, s], features per layer), in a forward
        if self.vision is not None and getattr(self.vision, "deepstack_layers", 0):
            self._add_deepstack_hooks(self.vision.deepstack_layers)

    def forward(
        self, input_ids, position_ids, attention_mask, decoder_input=None,
        pixel_values=None, image_grid_thw=None, **kwargs,
    ):  # fmt: skip
        if self.bidirectional_images and attention_mask is None:
            # every stage: the torch spec's attention reads the blocks (torch_layers.py)
            attention_mask = image_blocks(input_ids == self.image_token_id)
        if self.pre_process and decoder_input is None and pixel_values is not None:
            decoder_input = self.embed_with_images(input_ids, pixel_values, image_grid_thw)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs
        )

    def embed_with_images(self, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
        """Token embeddings [s, b, h] with the image tokens' rows replaced by image features."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        features = self.vision(pixel_values, image_grid_thw)  # [image tokens, h]
        placeholders = input_ids == self.image_token_id  # [b, s]
        if isinstance(features, tuple):  # (features, DeepStack's features per LM layer)
            features, deepstack = features
            self._deepstack = (placeholders, deepstack)
        if int(placeholders.sum()) != features.shape[0]:
            raise UserError(
                f"the text has {int(placeholders.sum())} image tokens, the images give "
                f"{features.shape[0]} features"
            )
        # filled batch-major, sequence-minor: the order of the images in the batch
        filled = embeddings.transpose(0, 1).masked_scatter(
            placeholders.unsqueeze(-1), features.to(embeddings.dtype)
        )
        return filled.transpose(0, 1).contiguous()

    def _add_deepstack_hooks(self, layers: int) -> None:
        """LM layer i's output gets DeepStack's i-th features added on the image tokens, for
        i < ``layers``: forward hooks on Megatron-Core's TransformerLayers of this (first)
        stage, fed by embed_with_images of the same forward; a forward of the model starts
        without any (text only: nothing added)."""
        if len(self.decoder.layers) < layers:
            raise UserError(
                f"DeepStack adds image features to the first {layers} language-model layers, "
                f"which must all be on the first pipeline stage (it has "
                f"{len(self.decoder.layers)}): use fewer pipeline stages"
            )
        self.register_forward_pre_hook(lambda module, args: setattr(module, "_deepstack", None))
        for i in range(layers):
            self.decoder.layers[i].register_forward_hook(functools.partial(self._deepstack_add, i))

    def _deepstack_add(self, index: int, layer, args, output):
        if self._deepstack is None:
            return output
        hidden, context = output  # hidden [s, b, h]
        placeholders, features = self._deepstack
        added = torch.zeros_like(hidden.transpose(0, 1)).masked_scatter(
            placeholders.unsqueeze(-1), features[index].to(hidden.dtype)
        )  # [b, s, h], image tokens in batch-major order (as embed_with_images fills them)
        return hidden + added.transpose(0, 1), context


class InterleavedMRoPE(nn.Module):
    """M-RoPE with the height and width frequencies interleaved with the temporal ones:
    frequency i follows the height position when i % 3 == 1 and i < 3 * section[1], the width
    when i % 3 == 2 and i < 3 * section[2], else the temporal one (Qwen3-VL; transformers'
    Qwen3VLTextRotaryEmbedding). Megatron-Core 0.16's MultimodalRotaryEmbedding takes
    contiguous sections only (Qwen2.5-VL); this one is called as GPTModel calls it and keeps
    its inverse frequencies: (positions [3, b, s], mrope_section, cp_group) -> [s, b, 1, d]."""

    def __init__(self, inv_freq: torch.Tensor, section: list[int]):
        super().__init__()
        self.inv_freq = inv_freq  # a plain attribute on the model's device, as Megatron-Core's
        i = torch.arange(inv_freq.numel())
        axes = torch.zeros_like(i)
        axes[(i % 3 == 1) & (i < 3 * section[1])] = 1
        axes[(i % 3 == 2) & (i < 3 * section[2])] = 2
        self.axes = axes

    def forward(self, position_ids, mrope_section=None, cp_group=None):
        inv = self.inv_freq
        # elementwise, as transformers: [3, b, s, d / 2]
        freqs = position_ids.to(inv.device)[..., None].float() * inv
        chosen = freqs.gather(0, self.axes.to(inv.device).expand(1, *freqs.shape[1:]))[0]
        emb = torch.cat([chosen, chosen], dim=-1)[:, :, None, :].transpose(0, 1).contiguous()
        if cp_group is not None and cp_group.size() > 1:
            raise UserError("context parallelism with interleaved M-RoPE is not supported yet")
        return emb  # [s, b, 1, d]


def apply_interleaved_mrope(model: nn.Module, cfg) -> None:
    """Swap the built model's M-RoPE for InterleavedMRoPE where the config asks for it."""
    emb = getattr(model, "rotary_pos_emb", None)
    if cfg.mrope_interleaved and emb is not None:
        model.rotary_pos_emb = InterleavedMRoPE(emb.inv_freq, cfg.mrope_section)


def freeze(model_chunks, language: bool, tower: bool, projection: bool) -> list[str]:
    """Turn gradients off for the language model, the vision tower (without its projection)
    and / or the projection (a tower's ``PROJECTION`` name prefixes); returns what was frozen.
    Megatron-Core's DDP and optimizer leave parameters without requires_grad out."""
    frozen = []
    for chunk in model_chunks:
        tower_module = getattr(chunk, "vision", None)
        prefixes = getattr(type(tower_module), "PROJECTION", ())
        for name, param in chunk.named_parameters():
            if not name.startswith("vision."):
                part = language
            elif name.removeprefix("vision.").startswith(prefixes):
                part = projection
            else:
                part = tower
            if part:
                param.requires_grad_(False)
                frozen.append(name)
    return frozen


def mrope_positions(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int, merge: int
) -> torch.Tensor:
    """M-RoPE positions [3, b, s] (temporal, height, width) of token ids [b, s].

    Text tokens advance all three rows by one. An image's tokens (t x h x w merged patches)
    start where the text left off and count frames, rows and columns from there; the text
    after it continues at that start + max(h, w).
    """
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    for row, ids in enumerate(input_ids.tolist()):
        i, pos = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                out[:, row, i] = pos
                i, pos = i + 1, pos + 1
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise UserError("the text has more image tokens than there are images") from None
            h, w = h // merge, w // merge
            grid = torch.stack(torch.meshgrid(
                torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
            )).reshape(3, -1)  # fmt: skip
            n = grid.shape[1]
            if ids[i : i + n] != [image_token_id] * n:
                raise UserError(f"an image of {n} tokens has fewer image tokens in the text")
            out[:, row, i : i + n] = grid + pos
            i, pos = i + n, pos + max(h, w)
    return out.to(input_ids.device)
