"""Vision towers' mappings. The CLIP / SigLIP tower's tables that LLaVA and Gemma 3 share
(models/llava/tower.py builds the tower): which HF vision_config fields ModelConfig.vision
keeps, every tensor such a tower may have, and the names of a multimodal checkpoint's parts
in transformers' layouts. And the mappings of every tower's Megatron-Core layers
(models/vision_encoder.py): qkv in Megatron's per-head layout, the MLP padded (padded_ffn).
"""

from __future__ import annotations

from megabridge.conversion.mappings import QKV, FusedQKV, GatedMLP, Mapping, hf_moved, renames
from megabridge.errors import UserError

# Stored-name prefix -> the one the mappings use (FamilyBridge.HF_RENAMES): the Hub's llava-hf
# and Gemma 3 files (vision_tower.vision_model.*) and transformers 5's in-memory names
# (model.language_model.*, lm_head.*) read as what transformers 5 writes.
HF_RENAMES = {
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.": "vision_tower.",
    "vision_tower.vision_model.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}
# A text family's HF names -> the same tensors' inside the multimodal checkpoint.
LANGUAGE_MODEL = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def language_model(mappings: list[Mapping]) -> list[Mapping]:
    """A text family's mappings with their HF names where the multimodal checkpoint keeps them."""
    for prefix, to in LANGUAGE_MODEL.items():
        mappings = hf_moved(mappings, prefix, to)
    return mappings


# The ViT's HF vision_config fields that ModelConfig.vision keeps (what the tower is built from).
VIT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_channels", "image_size", "patch_size", "layer_norm_eps",
    "hidden_act",
)  # fmt: skip
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")  # what tower.py builds
# Every tensor a CLIP or SigLIP tower may have besides its layers (clip_layers); a model
# holds those of its kind.
VIT_TENSORS = (
    "embeddings.class_embedding", "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias", "embeddings.position_embedding.weight",
    "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias",
    # SigLIP's pooling head (vision_use_head): carried, never run
    "head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
    "head.attention.out_proj.weight", "head.attention.out_proj.bias", "head.layernorm.weight",
    "head.layernorm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias", "head.mlp.fc2.weight",
    "head.mlp.fc2.bias",
)  # fmt: skip


def tower_mappings(projector: tuple[str, ...]) -> list:
    """The tower's and the projector's tensors: HF name <-> the same under ``vision.``, but
    the encoder's layers, which are Megatron-Core's (clip_layers)."""
    names = [f"vision_tower.{t}" for t in VIT_TENSORS] + [
        f"multi_modal_projector.{t}" for t in projector
    ]
    return [
        *renames({f"vision.{n}": n for n in names}),
        *clip_layers("vision_tower.encoder.layers"),
    ]


# Pixtral's tensors outside its layers (models/mistral3/tower.py), and its layers' prefix.
PIXTRAL_TENSORS = ("patch_conv.weight", "ln_pre.weight")


def pixtral_mappings(projector: tuple[str, ...]) -> list[Mapping]:
    """A Pixtral tower's and its projector's tensors: the layers as Megatron-Core layers
    (pixtral_vit_layers), the rest under ``vision.`` (the tower's without ``vision_tower.``)."""
    names = {f"vision.{t}": f"vision_tower.{t}" for t in PIXTRAL_TENSORS}
    names |= {f"vision.multi_modal_projector.{t}": f"multi_modal_projector.{t}" for t in projector}
    return [
        *renames(names),
        *pixtral_vit_layers("vision_tower.transformer.layers"),
    ]


# Pixtral's vision_config fields that ModelConfig.vision keeps (models/mistral3/tower.py).
PIXTRAL_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act",
)  # fmt: skip
PIXTRAL_ACTIVATIONS = ("silu", "gelu")  # gated MLP activations the tower's layers build


def read_pixtral(name: str, v) -> dict:
    """ModelConfig.vision's Pixtral fields from an HF vision_config; refused in one line if
    the tower cannot build it."""
    if v.model_type != "pixtral":
        raise UserError(f"{name} with a {v.model_type!r} vision tower is not supported yet")
    if v.hidden_act not in PIXTRAL_ACTIVATIONS:
        raise UserError(f"{name} with vision hidden_act={v.hidden_act!r} is not supported yet")
    rope = dict(v.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise UserError(f"{name} with vision rope_type={rope['rope_type']!r} is not supported yet")
    return {
        "model_type": "pixtral",
        **{f: getattr(v, f) for f in PIXTRAL_FIELDS},
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
    }


def write_pixtral(vision: dict) -> dict:
    return {
        **{f: vision[f] for f in ("model_type", *PIXTRAL_FIELDS)},
        "head_dim": vision["hidden_size"] // vision["num_attention_heads"],
        "rope_parameters": {"rope_type": "axial", "rope_theta": vision["rope_theta"]},
    }


def read_vit(cls, v) -> dict:
    """ModelConfig.vision's ViT fields from an HF vision_config; refused in one line if
    tower.py cannot build it."""
    if v.model_type not in VISION_MODEL_TYPES:
        raise UserError(
            f"{cls.display_name()} with a {v.model_type!r} vision tower is not supported yet"
        )
    if v.hidden_act not in ACTIVATIONS:
        raise UserError(
            f"{cls.display_name()} with vision hidden_act={v.hidden_act!r} is not supported yet"
        )
    vit = {name: getattr(v, name) for name in VIT_FIELDS}
    if v.model_type == "siglip_vision_model":
        vit["vision_use_head"] = bool(v.vision_use_head)
    return vit


def write_vit(vision: dict) -> dict:
    return {k: vision[k] for k in (*VIT_FIELDS, "vision_use_head") if k in vision}


# A tower's Megatron-Core MLP width is padded to a multiple of this, so that every TP size
# that divides its heads splits it (Qwen2.5-VL's 3420 -> 3456 for TP=8): the extra units are
# zero in and out, so they add nothing, get zero gradients, and are dropped again on export.
# The same for every layout: a checkpoint loads at any TP.
FFN_MULTIPLE = 64


def padded_ffn(size: int) -> int:
    return -(-size // FFN_MULTIPLE) * FFN_MULTIPLE


class VisionQKV(FusedQKV):
    """A vision tower's qkv (rows: all queries, all keys, all values; transformers' Qwen ViTs)
    <-> its Megatron-Core linear_qkv (per-head [q; k; v]), with the tower's heads
    (``cfg.vision``), not the language model's. Weights [3 * h, h] and biases [3 * h]."""

    def hf_to_megatron(self, tensors, cfg):
        return super().hf_to_megatron(tensors, _tower_shape(cfg))

    def megatron_to_hf(self, tensor, cfg):
        return super().megatron_to_hf(tensor, _tower_shape(cfg))


def tower_heads(vision: dict) -> int:
    """A tower's attention heads (HF: num_heads in Qwen's vision_config, num_attention_heads
    in CLIP's and SigLIP's)."""
    return vision["num_heads"] if "num_heads" in vision else vision["num_attention_heads"]


def _tower_shape(cfg):
    from types import SimpleNamespace

    heads, hidden = tower_heads(cfg.vision), cfg.vision["hidden_size"]
    return SimpleNamespace(
        num_attention_heads=heads, num_query_groups=heads, kv_channels=None, hidden_size=hidden
    )


class VisionSplitQKV(QKV):
    """A vision tower's separate q, k and v projections (CLIP's, SigLIP's, Pixtral's) <->
    its Megatron-Core linear_qkv (per-head [q; k; v]), with the tower's heads (``cfg.vision``),
    not the language model's."""

    def hf_to_megatron(self, tensors, cfg):
        return super().hf_to_megatron(tensors, _tower_shape(cfg))

    def megatron_to_hf(self, tensor, cfg):
        return super().megatron_to_hf(tensor, _tower_shape(cfg))

    def megatron_to_hf_views(self, tensor, cfg):
        return super().megatron_to_hf_views(tensor, _tower_shape(cfg))


class VisionGatedMLP(GatedMLP):
    """HF gate and up [ffn, ...] <-> the tower's linear_fc1 [gate; up], each half zero-padded
    to padded_ffn rows (weights and biases)."""

    def hf_to_megatron(self, tensors, cfg):
        import torch.nn.functional as F

        pad = padded_ffn(cfg.vision["intermediate_size"]) - tensors[0].shape[0]
        rows = [0, 0] * (tensors[0].dim() - 1) + [0, pad]  # F.pad counts from the last dim
        return super().hf_to_megatron([F.pad(t, rows) for t in tensors], cfg)

    def megatron_to_hf(self, tensor, cfg):
        ffn = cfg.vision["intermediate_size"]
        return [t[:ffn].contiguous() for t in super().megatron_to_hf(tensor, cfg)]


class VisionDown(Mapping):
    """HF down_proj.weight [hidden, ffn] <-> the tower's linear_fc2.weight, zero-padded to
    padded_ffn columns."""

    # peft/export.py: a LoRA A of this layer [r, padded] has the weight's padded columns too
    PADDED_INPUT = True

    def hf_to_megatron(self, tensors, cfg):
        import torch.nn.functional as F

        (t,) = tensors
        return F.pad(t, [0, padded_ffn(cfg.vision["intermediate_size"]) - t.shape[1]])

    def megatron_to_hf(self, tensor, cfg):
        return [tensor[:, : cfg.vision["intermediate_size"]].contiguous()]


class VisionUp(Mapping):
    """HF fc1 [ffn, ...] (weight or bias) <-> the tower's plain (not gated) linear_fc1,
    zero-padded to padded_ffn rows."""

    def hf_to_megatron(self, tensors, cfg):
        import torch.nn.functional as F

        (t,) = tensors
        pad = padded_ffn(cfg.vision["intermediate_size"]) - t.shape[0]
        return F.pad(t, [0, 0] * (t.dim() - 1) + [0, pad])

    def megatron_to_hf(self, tensor, cfg):
        return [tensor[: cfg.vision["intermediate_size"]].contiguous()]


def clip_layers(hf: str) -> list[Mapping]:
    """CLIP's and SigLIP's encoder layers (HF ``{hf}.N.``: layer_norm1, self_attn.{q,k,v,out}
    _proj, layer_norm2, mlp.fc1 / fc2, biases everywhere) <-> the tower's Megatron-Core
    layers (``vision.{hf}.N.``, models/llava/tower.py): q, k, v fused per head, the plain MLP
    padded (padded_ffn)."""
    megatron = f"vision.{hf}.*."
    layers = renames({
        **{f"{megatron}input_layernorm.{w}": f"{hf}.*.layer_norm1.{w}" for w in _WB},
        **{f"{megatron}pre_mlp_layernorm.{w}": f"{hf}.*.layer_norm2.{w}" for w in _WB},
        **{f"{megatron}self_attention.linear_proj.{w}": f"{hf}.*.self_attn.out_proj.{w}"
           for w in _WB},
        f"{megatron}mlp.linear_fc2.bias": f"{hf}.*.mlp.fc2.bias",
    })  # fmt: skip
    layers.append(VisionDown(f"{megatron}mlp.linear_fc2.weight", f"{hf}.*.mlp.fc2.weight"))
    for w in _WB:
        qkv = tuple(f"{hf}.*.self_attn.{p}_proj.{w}" for p in "qkv")
        layers.append(VisionSplitQKV(f"{megatron}self_attention.linear_qkv.{w}", qkv))
        layers.append(VisionUp(f"{megatron}mlp.linear_fc1.{w}", f"{hf}.*.mlp.fc1.{w}"))
    return layers


def qwen3_vit_layers(hf: str) -> list[Mapping]:
    """Qwen3-VL's ViT blocks (HF ``{hf}.N.``: LayerNorms norm1 / norm2, attn.qkv, attn.proj,
    mlp.linear_fc1 / linear_fc2 with tanh-GELU) <-> the tower's Megatron-Core layers
    (``vision.blocks.N.``): as qwen_vit_layers, with norm biases and a plain MLP."""
    megatron = "vision.blocks.*."
    layers = renames({
        **{f"{megatron}input_layernorm.{w}": f"{hf}.*.norm1.{w}" for w in _WB},
        **{f"{megatron}pre_mlp_layernorm.{w}": f"{hf}.*.norm2.{w}" for w in _WB},
        **{f"{megatron}self_attention.linear_proj.{w}": f"{hf}.*.attn.proj.{w}" for w in _WB},
        f"{megatron}mlp.linear_fc2.bias": f"{hf}.*.mlp.linear_fc2.bias",
    })  # fmt: skip
    layers.append(VisionDown(f"{megatron}mlp.linear_fc2.weight", f"{hf}.*.mlp.linear_fc2.weight"))
    for w in _WB:
        layers.append(VisionQKV(f"{megatron}self_attention.linear_qkv.{w}", f"{hf}.*.attn.qkv.{w}"))
        layers.append(VisionUp(f"{megatron}mlp.linear_fc1.{w}", f"{hf}.*.mlp.linear_fc1.{w}"))
    return layers


def qwen_vit_layers(hf: str) -> list[Mapping]:
    """Qwen2.5-VL's ViT blocks (HF ``{hf}.N.``: norm1, attn.qkv, attn.proj, norm2, SiLU-gated
    mlp) <-> the tower's Megatron-Core TransformerLayers (``vision.blocks.N.``,
    models/vision_encoder.py): qkv in Megatron's per-head layout, gate and up fused into
    linear_fc1, the MLP width padded (padded_ffn)."""
    megatron = "vision.blocks.*."
    layers = renames({
        f"{megatron}input_layernorm.weight": f"{hf}.*.norm1.weight",
        f"{megatron}pre_mlp_layernorm.weight": f"{hf}.*.norm2.weight",
        **{f"{megatron}self_attention.linear_proj.{w}": f"{hf}.*.attn.proj.{w}" for w in _WB},
        f"{megatron}mlp.linear_fc2.bias": f"{hf}.*.mlp.down_proj.bias",
    })  # fmt: skip
    layers.append(VisionDown(f"{megatron}mlp.linear_fc2.weight", f"{hf}.*.mlp.down_proj.weight"))
    for w in _WB:
        layers.append(VisionQKV(f"{megatron}self_attention.linear_qkv.{w}", f"{hf}.*.attn.qkv.{w}"))
        gate_up = (f"{hf}.*.mlp.gate_proj.{w}", f"{hf}.*.mlp.up_proj.{w}")
        layers.append(VisionGatedMLP(f"{megatron}mlp.linear_fc1.{w}", gate_up))
    return layers


def pixtral_vit_layers(hf: str) -> list[Mapping]:
    """Pixtral's ViT layers (HF ``{hf}.N.``: attention_norm, attention.{q,k,v,o}_proj,
    ffn_norm, SiLU-gated feed_forward; no biases) <-> the tower's Megatron-Core layers
    (``vision.blocks.N.``): q, k, v fused into linear_qkv, gate and up into linear_fc1, the MLP
    width padded (padded_ffn)."""
    megatron, layer = "vision.blocks.*.", f"{hf}.*."
    layers = renames({
        f"{megatron}input_layernorm.weight": f"{layer}attention_norm.weight",
        f"{megatron}pre_mlp_layernorm.weight": f"{layer}ffn_norm.weight",
        f"{megatron}self_attention.linear_proj.weight": f"{layer}attention.o_proj.weight",
    })  # fmt: skip
    qkv = tuple(f"{layer}attention.{p}_proj.weight" for p in "qkv")
    gate_up = (f"{layer}feed_forward.gate_proj.weight", f"{layer}feed_forward.up_proj.weight")
    return [
        *layers,
        VisionSplitQKV(f"{megatron}self_attention.linear_qkv.weight", qkv),
        VisionGatedMLP(f"{megatron}mlp.linear_fc1.weight", gate_up),
        VisionDown(f"{megatron}mlp.linear_fc2.weight", f"{layer}feed_forward.down_proj.weight"),
    ]


_WB = ("weight", "bias")
