"""Vision-language models: a vision tower in front of Megatron-Core's GPTModel.

``VisionLanguageModel`` is a GPTModel whose first pipeline stage also holds a vision
tower (``vision``). The tower turns an image's patches into features; they replace the
image placeholder tokens' embeddings, and the language model runs on the result
(``decoder_input``), with M-RoPE (three position rows: temporal, height, width) where
the family asks for it. The language model's parameters keep GPTModel's names, so the
text families' mappings, sharding and checkpoints apply unchanged; the tower's are
under ``vision.``.

``ModelConfig.vision`` describes the tower, ``TOWERS`` builds it by ``vision["kind"]``.
Every tower's layers are Megatron-Core TransformerLayers split over tensor-parallel ranks
(models/vision_encoder.py): Qwen2.5-VL's (here), Qwen3-VL's (models/qwen3_vl/tower.py),
LLaVA's and Gemma 3's CLIP / SigLIP (models/llava/tower.py); their patch embeddings, mergers
and projectors are whole on every rank. With
``bidirectional_image_attention`` (Gemma 3) every stage passes the image tokens' block ids
as the attention mask, and the torch spec lets each image's tokens see each other.

Qwen2.5-VL's tower (``Qwen25VisionTower``): a Conv3d patch embedding, pre-norm blocks
(RMSNorm, QKV attention with biases, SiLU-gated MLP with biases) with 2D RoPE
over (row, column) of each patch, attention inside windows of
``window_size // patch_size`` patches square except in ``fullatt_block_indexes``, and a
patch merger (RMSNorm, then an MLP over each ``spatial_merge_size``^2 neighbourhood).
Patches arrive grouped by merge neighbourhood (the image processor's order); the
blocks see them regrouped by window, and the merger's output goes back to the
processor's order.

Video (towers in ``VIDEO_TOWERS``: Qwen2.5-VL, Qwen3-VL): a clip's frames, two per temporal
patch, go through the same tower (``pixel_values_videos``, ``video_grid_thw``); their features
replace the video placeholder tokens (``embed_videos``; Qwen3-VL: DeepStack's too). M-RoPE
(``video_position_args``): Qwen2.5-VL spaces the clip's temporal patches by ``video_steps``;
Qwen3-VL's processor writes each temporal patch's time into the text ("<0.5 seconds>", then
the patch's tokens between vision start and end), and each patch is placed as an image of its
own (transformers' Qwen3-VL get_rope_index).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megabridge.conversion import vit
from megabridge.errors import UserError
from megabridge.models import vision_encoder
from megabridge.models.attention_ops import image_blocks
from megabridge.models.llava import tower
from megabridge.models.mistral3.tower import Mistral3Vision, PixtralLlavaVision
from megabridge.models.qwen3_vl.tower import Qwen3VisionTower
from megabridge.models.vision_layers import (
    PatchEmbed,
    VisionRMSNorm,
    frame_bounds,
    patch_rows_cols,
    rope_inv_freq,
)


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


class Qwen25VisionTower(MegatronModule):
    """Qwen2.5-VL's windowed ViT: pixel patches [patches, c*t*p*p] -> features [tokens, out].

    Its blocks are Megatron-Core TransformerLayers split over TP (models/vision_encoder.py);
    the patch embedding and the merger are whole on every rank."""

    PROJECTION = ("merger.",)  # what model.freeze_vision_projection freezes (freeze())
    MEGATRON_LAYERS = True  # built with the language model's TransformerConfig (runtime)

    def __init__(self, v: dict, lm_config):
        hidden, heads = v["hidden_size"], v["num_heads"]
        config = vision_encoder.tower_config(
            lm_config, depth=v["depth"], hidden=hidden, heads=heads,
            ffn=vit.padded_ffn(v["intermediate_size"]),  # zero units: TP=8 splits 3420 too
            activation=v["hidden_act"], gated=True, normalization="RMSNorm", eps=1e-6,
        )  # fmt: skip
        super().__init__(config=config)
        self.merge = v["spatial_merge_size"]
        self.full_blocks = set(v["fullatt_block_indexes"])
        # window side in merged tokens
        self.window = v["window_size"] // self.merge // v["patch_size"]
        self.patch_embed = PatchEmbed(
            v["in_channels"], v["temporal_patch_size"], v["patch_size"], hidden, bias=False
        )
        self.blocks = vision_encoder.TowerLayers(config, "RMSNorm", v["intermediate_size"])
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
        angles = torch.cat([angles, angles], dim=-1)  # [patches, head_dim]
        images = vision_encoder.segments(frame_bounds(grids), x.device)
        windows = vision_encoder.segments(windows, x.device)
        for i, layer in enumerate(self.blocks):
            segments = images if i in self.full_blocks else windows
            x = vision_encoder.run_layer(layer, x, segments, angles)
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
    "mistral3": Mistral3Vision,  # Pixtral + Mistral 3's norm, patch merger and projector
    "pixtral": PixtralLlavaVision,  # Pixtral + LLaVA's projector (Pixtral-12B)
}


# Tower kinds whose model takes video frames (their M-RoPE positions: video_position_args).
VIDEO_TOWERS = ("qwen2_5_vl", "qwen3_vl")


def _filled(embeddings, placeholders, features, what: str) -> torch.Tensor:
    """``embeddings`` [s, b, h] with the rows of ``placeholders`` [b, s] replaced by
    ``features`` [placeholders, h], batch-major, sequence-minor: the order of the images (or
    videos) in the batch."""
    if int(placeholders.sum()) != features.shape[0]:
        raise UserError(
            f"the text has {int(placeholders.sum())} {what} tokens, the {what}s give "
            f"{features.shape[0]} features"
        )
    filled = embeddings.transpose(0, 1).masked_scatter(
        placeholders.unsqueeze(-1), features.to(embeddings.dtype)
    )
    return filled.transpose(0, 1).contiguous()


class VisionLanguageModel(GPTModel):
    """GPTModel plus a vision tower on the first pipeline stage (see the module docstring)."""

    def __init__(self, *args, vision: dict, bidirectional_images: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_token_id = vision["image_token_id"]
        self.video_token_id = vision.get("video_token_id")
        self.vision_kind = vision["kind"]
        self.vision = None
        if self.pre_process:
            tower = TOWERS[vision["kind"]]
            # a tower of Megatron-Core layers shares the language model's dtype, init and TP
            self.vision = (
                tower(vision, self.config)
                if getattr(tower, "MEGATRON_LAYERS", False)
                else tower(vision)
            )
        self.bidirectional_images = (
            bidirectional_images  # ModelConfig.bidirectional_image_attention
        )
        # DeepStack (Qwen3-VL): a tower that also returns features for the first LM layers
        self._deepstack = None  # [(placeholder positions [b, s], features per layer)] of images, then videos, in a forward
        if self.vision is not None and getattr(self.vision, "deepstack_layers", 0):
            self._add_deepstack_hooks(self.vision.deepstack_layers)

    def forward(
        self, input_ids, position_ids, attention_mask, decoder_input=None,
        pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
        image_sizes=None, **kwargs,
    ):  # fmt: skip
        if self.bidirectional_images and attention_mask is None:
            # every stage: the torch spec's attention reads the blocks (torch_layers.py)
            attention_mask = image_blocks(input_ids == self.image_token_id)
        visual = pixel_values is not None or pixel_values_videos is not None
        if self.pre_process and decoder_input is None and visual:
            # Qwen's towers take the patch grids, Pixtral's each image's size in pixels
            grid = image_grid_thw if image_grid_thw is not None else image_sizes
            decoder_input = self.embed_with_images(input_ids, pixel_values, grid)
            if pixel_values_videos is not None:
                decoder_input = self.embed_videos(
                    decoder_input, input_ids, pixel_values_videos, video_grid_thw
                )
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs
        )

    def embed_with_images(self, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
        """Token embeddings [s, b, h] with the image tokens' rows replaced by image features
        (``pixel_values`` None: the embeddings alone, for embed_videos to fill)."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is None:
            return embeddings
        features = self.vision(pixel_values, image_grid_thw)  # [image tokens, h]
        placeholders = input_ids == self.image_token_id  # [b, s]
        return _filled(embeddings, placeholders, self._keep_deepstack(features, placeholders),
                       "image")  # fmt: skip

    def embed_videos(self, embeddings, input_ids, pixel_values_videos, video_grid_thw):
        """``embeddings`` [s, b, h] with the video tokens' rows replaced by the frames' features.
        Qwen2.5-VL and Qwen3-VL embed a video's patches (pairs of frames: temporal_patch_size
        2) with the same tower as images; only the placeholder token and M-RoPE positions
        differ (Qwen3-VL: DeepStack adds the video's features as it adds the images')."""
        if self.vision_kind not in VIDEO_TOWERS:
            raise UserError(f"video input for {self.vision_kind} is not supported yet")
        features = self.vision(pixel_values_videos, video_grid_thw)  # [video tokens, h]
        placeholders = input_ids == self.video_token_id  # [b, s]
        return _filled(embeddings, placeholders, self._keep_deepstack(features, placeholders),
                       "video")  # fmt: skip

    def _keep_deepstack(self, features, placeholders) -> torch.Tensor:
        """The features; a tower's (features, DeepStack's features per LM layer) keeps the
        latter, with the tokens they go to, for _deepstack_add (images, then videos)."""
        if not isinstance(features, tuple):
            return features
        features, deepstack = features
        self._deepstack = [*(self._deepstack or []), (placeholders, deepstack)]
        return features

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
        added = torch.zeros_like(hidden.transpose(0, 1))  # [b, s, h]
        for placeholders, features in self._deepstack:  # images', videos' (disjoint tokens)
            # their tokens in batch-major order, as embed_with_images / embed_videos fill them
            added = added.masked_scatter(
                placeholders.unsqueeze(-1), features[index].to(hidden.dtype)
            )
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
    Megatron-Core's DDP and optimizer leave parameters without requires_grad out. The
    tower's parameters that its features never depend on (its ``no_gradient()`` prefixes:
    CLIP's post-norm, SigLIP's pooling head, layers after LLaVA's feature layer) are frozen
    always: a gradient for them never comes, and DDP must not wait for one."""
    frozen = []
    for chunk in model_chunks:
        tower_module = getattr(chunk, "vision", None)
        prefixes = getattr(type(tower_module), "PROJECTION", ())
        unused = tower_module.no_gradient() if hasattr(tower_module, "no_gradient") else ()
        for name, param in chunk.named_parameters():
            in_tower = name.removeprefix("vision.")
            if not name.startswith("vision."):
                part = language
            elif in_tower.startswith(unused):
                part = True
            elif in_tower.startswith(prefixes):
                part = projection
            else:
                part = tower
            if part:
                param.requires_grad_(False)
                frozen.append(name)
    return frozen


def mrope_positions(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int, merge: int,
    video_grid_thw: torch.Tensor | None = None, video_token_id: int | None = None,
    video_steps: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """M-RoPE positions [3, b, s] (temporal, height, width) of token ids [b, s].

    Text tokens advance all three rows by one. An image's or video's tokens (t x h x w merged
    patches) start where the text left off and count frames, rows and columns from there; the
    text after it continues at that start + max(h, w). A video's frame count is scaled by its
    ``video_steps`` entry (Qwen2.5-VL: tokens_per_second * seconds per temporal patch, see
    video_steps), truncated to an integer, as transformers' get_rope_index does. (Text after a
    video continues at start + max(h, w) as in transformers 5; transformers 4 and Qwen's own
    code continued after the largest position, the temporal one included.)
    """
    grids = {image_token_id: iter([] if image_grid_thw is None else image_grid_thw.tolist())}
    if video_grid_thw is not None:
        grids[video_token_id] = iter(video_grid_thw.tolist())
    steps = iter([] if video_steps is None else video_steps)
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    for row, ids in enumerate(input_ids.tolist()):
        i, pos = 0, 0
        while i < len(ids):
            token = ids[i]
            if token not in grids:
                out[:, row, i] = pos
                i, pos = i + 1, pos + 1
                continue
            what = "image" if token == image_token_id else "video"
            try:
                t, h, w = next(grids[token])
                step = 1 if what == "image" else next(steps)
            except StopIteration:
                raise UserError(f"the text has more {what} tokens than there are {what}s") from None
            h, w = h // merge, w // merge
            temporal = (torch.arange(t) * step).long()
            grid = torch.stack(torch.meshgrid(
                temporal, torch.arange(h), torch.arange(w), indexing="ij"
            )).reshape(3, -1)  # fmt: skip
            n = grid.shape[1]
            if ids[i : i + n] != [token] * n:
                article = "an" if what == "image" else "a"
                raise UserError(
                    f"{article} {what} of {n} tokens has fewer {what} tokens in the text"
                )
            out[:, row, i : i + n] = grid + pos
            i, pos = i + n, pos + max(h, w)
    return out.to(input_ids.device)


def video_position_args(vision: dict, video_grid_thw, second_per_grid_ts) -> dict:
    """mrope_positions' video arguments for clips of ``video_grid_thw`` [clips, 3].

    Qwen2.5-VL: a clip's temporal patches on one grid, spaced by video_steps (its
    ``second_per_grid_ts``). Qwen3-VL: every temporal patch is placed as an image of its own
    (a [1, h, w] grid): the processor separates them in the text by their timestamps, which
    carry the time instead (transformers' Qwen3-VL get_rope_index; ``second_per_grid_ts``
    unused, None)."""
    if vision["kind"] == "qwen3_vl":
        grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
        grids[:, 0] = 1
        steps = torch.ones(grids.shape[0])
    else:
        grids, steps = video_grid_thw, video_steps(vision, second_per_grid_ts)
    return {"video_grid_thw": grids, "video_token_id": vision["video_token_id"],
            "video_steps": steps}  # fmt: skip


def video_steps(vision: dict, second_per_grid_ts) -> torch.Tensor:
    """Each video's temporal position step: tokens_per_second * its seconds per temporal
    patch (temporal_patch_size / fps), in fp32 as transformers computes it."""
    seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).reshape(-1)
    return vision["tokens_per_second"] * seconds
