"""The vision side of LLaVA-style models and Gemma 3: a CLIP or SigLIP ViT (``ViT``) and the
projector that maps its features into the language model's embeddings.

The encoder's layers are Megatron-Core TransformerLayers (models/vision_encoder.py: pre-norm
LayerNorm, biases everywhere, bidirectional attention within each image, no RoPE), their
heads and MLP split over tensor-parallel ranks; conversion/vit.py ``clip_layers`` maps
transformers' q/k/v, out_proj, fc1/fc2 onto them. Everything else (embeddings, pre/post
norms, SigLIP's pooling head, the projector) keeps transformers' names
(``vision_tower.post_layernorm``, ``multi_modal_projector.linear_1``), mapped one to one, and
is whole on every rank. The tower lives on the first pipeline stage (models/vision.py);
``ModelConfig.vision`` (the HF vision_config fields plus the projector's) describes it.

* ``LlavaVision`` (kind "llava"): the ViT's hidden states of ``vision_feature_layer``
  (one index or a list, concatenated), without the class token under the "default"
  select strategy, through linear - activation - linear.
* ``Gemma3Vision`` (kind "gemma3"): SigLIP's last hidden state (after its post-norm),
  average-pooled to ``mm_tokens_per_image`` tokens, a (1 + w) RMSNorm, then a linear map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megabridge.conversion import vit
from megabridge.models import vision_encoder

# HF activation names -> functions, the towers' own (the bridge refuses any other name in one
# line): the pooling head's and the projector's.
ACTIVATIONS = vision_encoder.ACTIVATIONS


class Embeddings(nn.Module):
    """Patches (a conv of stride patch) plus learned positions; CLIP prepends a class token."""

    def __init__(self, v: dict):
        super().__init__()
        hidden, patch = v["hidden_size"], v["patch_size"]
        self.clip = v["model_type"] == "clip_vision_model"
        positions = (v["image_size"] // patch) ** 2 + self.clip
        if self.clip:
            self.class_embedding = nn.Parameter(torch.zeros(hidden))
        # CLIP's patch conv has no bias, SigLIP's has one
        self.patch_embedding = nn.Conv2d(
            v["num_channels"], hidden, kernel_size=patch, stride=patch, bias=not self.clip
        )
        self.position_embedding = nn.Embedding(positions, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # [images, channels, size, size] -> [images, positions, hidden]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.clip:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class MLP(nn.Module):
    """fc1 - activation - fc2 (SigLIP's pooling head's; the layers' MLPs are Megatron-Core's)."""

    def __init__(self, hidden: int, ffn: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Encoder(MegatronModule):
    """The ViT's layers: Megatron-Core TransformerLayers split over TP (``layers.N.``;
    conversion/vit.py ``clip_layers`` maps transformers' ``encoder.layers.N.``)."""

    def __init__(self, config, ffn_units: int):
        super().__init__(config=config)
        self.layers = vision_encoder.TowerLayers(config, "LayerNorm", ffn_units)


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head (vision_use_head): carried so that the checkpoint
    round-trips, never run (neither LLaVA nor Gemma 3 reads the pooled output)."""

    def __init__(self, v: dict):
        super().__init__()
        hidden = v["hidden_size"]
        self.probe = nn.Parameter(torch.zeros(1, 1, hidden))
        self.attention = nn.MultiheadAttention(hidden, v["num_attention_heads"], batch_first=True)
        self.layernorm = nn.LayerNorm(hidden, eps=v["layer_norm_eps"])
        self.mlp = MLP(hidden, v["intermediate_size"], v["hidden_act"])


class ViT(MegatronModule):
    """CLIP's or SigLIP's vision transformer (``model_type`` clip_vision_model /
    siglip_vision_model): pixel values -> the hidden state after each layer. Its layers are
    Megatron-Core's, built with the language model's runtime (``lm_config``: dtype, init,
    TP); embeddings, norms and the pooling head are whole on every rank."""

    def __init__(self, v: dict, lm_config):
        hidden, eps = v["hidden_size"], v["layer_norm_eps"]
        config = vision_encoder.tower_config(
            lm_config, depth=v["num_hidden_layers"], hidden=hidden,
            heads=v["num_attention_heads"], ffn=vit.padded_ffn(v["intermediate_size"]),
            activation=v["hidden_act"], gated=False, normalization="LayerNorm", eps=eps,
        )  # fmt: skip
        super().__init__(config=config)
        self.embeddings = Embeddings(v)
        if self.embeddings.clip:  # spelled so in CLIP's checkpoints
            self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = Encoder(config, v["intermediate_size"])
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)
        if v.get("vision_use_head"):
            self.head = PoolingHead(v)

    def unused(self, last: int, post_norm: bool) -> tuple[str, ...]:
        """Name prefixes of the parameters that features from layers up to ``last`` (after
        the post-norm if ``post_norm``) do not depend on: they get no gradient, and training
        freezes them (models/vision.py freeze)."""
        names = [f"encoder.layers.{i}." for i in range(last, len(self.encoder.layers))]
        names += [] if post_norm else ["post_layernorm."]
        return tuple(names + (["head."] if hasattr(self, "head") else []))

    def hidden_states(self, pixels: torch.Tensor, last: int) -> list[torch.Tensor]:
        """[encoder input, output of layer 1, ..., of layer ``last``], each [images, s, h]."""
        x = self.embeddings(pixels)
        if self.embeddings.clip:
            x = self.pre_layrnorm(x)
        n, s, _ = x.shape
        # the images one after another, [images * s, h], each attending within itself
        images = vision_encoder.segments([i * s for i in range(n + 1)], x.device)
        states = [x]
        x = x.flatten(0, 1)
        for layer in list(self.encoder.layers)[:last]:
            x = vision_encoder.run_layer(layer, x, images, angles=None)
            states.append(x.view(n, s, -1))
        return states


class LlavaVision(MegatronModule):
    """LLaVA: the ViT's selected hidden states through the two-layer projector."""

    PROJECTION = ("multi_modal_projector.",)  # what model.freeze_vision_projection freezes
    MEGATRON_LAYERS = True  # built with the language model's TransformerConfig (runtime)

    def __init__(self, v: dict, lm_config):
        tower = ViT(v, lm_config)
        super().__init__(config=tower.config)
        self.vision_tower = tower
        layers = v["vision_feature_layer"]
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        depth = v["num_hidden_layers"]
        # HF indexes hidden_states (depth + 1 of them) from either end
        self.feature_layers = [i % (depth + 1) for i in self.feature_layers]
        self.drop_class_token = v["vision_feature_select_strategy"] == "default"
        features, out = v["hidden_size"] * len(self.feature_layers), v["text_hidden_size"]
        bias = v["multimodal_projector_bias"]
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(features, out, bias=bias)
        self.multi_modal_projector.linear_2 = nn.Linear(out, out, bias=bias)
        self.act = ACTIVATIONS[v["projector_hidden_act"]]

    def no_gradient(self) -> tuple[str, ...]:
        """The ViT's layers after the deepest feature layer, its post-norm and head."""
        unused = self.vision_tower.unused(max(self.feature_layers), post_norm=False)
        return tuple(f"vision_tower.{name}" for name in unused)

    def forward(self, pixel_values: torch.Tensor, grid=None) -> torch.Tensor:
        """pixel_values [images, c, size, size] -> features [images * tokens, text hidden]."""
        states = self.vision_tower.hidden_states(pixel_values, max(self.feature_layers))
        x = torch.cat([states[i] for i in self.feature_layers], dim=-1)
        if self.drop_class_token:  # transformers drops the first position, CLS or not
            x = x[:, 1:]
        p = self.multi_modal_projector
        return p.linear_2(self.act(p.linear_1(x))).flatten(0, 1)


class Gemma3Projector(nn.Module):
    def __init__(self, v: dict):
        super().__init__()
        hidden = v["hidden_size"]
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(hidden, v["text_hidden_size"]))
        self.mm_soft_emb_norm = nn.Module()
        self.mm_soft_emb_norm.weight = nn.Parameter(torch.zeros(hidden))
        self.eps = v["layer_norm_eps"]
        self.side = v["image_size"] // v["patch_size"]  # patches per side
        self.pool = self.side // int(v["mm_tokens_per_image"] ** 0.5)  # pooling kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [images, side * side, h] -> [images, tokens, text hidden]
        n, _, h = x.shape
        grid = x.transpose(1, 2).reshape(n, h, self.side, self.side)
        x = F.avg_pool2d(grid, self.pool, self.pool).flatten(2).transpose(1, 2)
        # Gemma's RMSNorm: fp32, times (1 + w), then back to the input's dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = (x32 * (1.0 + self.mm_soft_emb_norm.weight.float())).type_as(x)
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(x)


class Gemma3Vision(MegatronModule):
    """Gemma 3: SigLIP's last hidden state (post-normed), pooled and projected."""

    PROJECTION = ("multi_modal_projector.",)  # what model.freeze_vision_projection freezes
    MEGATRON_LAYERS = True  # built with the language model's TransformerConfig (runtime)

    def __init__(self, v: dict, lm_config):
        tower = ViT(v, lm_config)
        super().__init__(config=tower.config)
        self.vision_tower = tower
        self.multi_modal_projector = Gemma3Projector(v)

    def no_gradient(self) -> tuple[str, ...]:
        """SigLIP's pooling head (carried for the round trip, never run)."""
        layers = len(self.vision_tower.encoder.layers)
        return tuple(f"vision_tower.{n}" for n in self.vision_tower.unused(layers, post_norm=True))

    def forward(self, pixel_values: torch.Tensor, grid=None) -> torch.Tensor:
        tower = self.vision_tower
        last = tower.hidden_states(pixel_values, len(tower.encoder.layers))[-1]
        return self.multi_modal_projector(tower.post_layernorm(last)).flatten(0, 1)
