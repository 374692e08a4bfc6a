"""A vision tower's transformer layers as Megatron-Core TransformerLayers, tensor-parallel.

The layers are Megatron-Core's (``TransformerLayer``, ``SelfAttention``, ``MLP``, with
``ColumnParallelLinear`` / ``RowParallelLinear``: heads and FFN split over the
tensor-parallel ranks) with the torch spec's norms and attention (models/torch_layers.py),
built from a TransformerConfig of the tower's own shape. Attention is bidirectional
(``AttnMaskType.no_mask``) within segments, the windows or frames the tower cuts its
patches into, given as ``PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=...)``: with
"sbhd", Megatron-Core applies the tower's per-patch RoPE angles (``rotary_pos_emb`` [s, 1,
1, d]) as they are, where "thd" would restart positions in every segment. Its rotation
(non-interleaved, rotate-half) is transformers' vision RoPE; in fp32 the two agree
exactly (tests/unit_tests/models/test_vision_language.py), in bf16 Megatron-Core rotates
in the weights' dtype where transformers rotates in fp32.

The patch embedding and whatever else a tower has around the layers stay plain torch
modules, whole on every tensor-parallel rank. Towers: Qwen2.5-VL's (models/vision.py),
Qwen3-VL's (models/qwen3_vl/tower.py), CLIP's and SigLIP's (models/llava/tower.py: LLaVA and
Gemma 3; no RoPE, each image one segment).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megabridge.models import attention_ops, torch_layers

# What a tower's layers take from the language model's config: precision, initialisation
# and the tensor-parallel size; never its shape, MoE, pipeline or sequence parallelism.
_RUNTIME_FIELDS = (
    "tensor_model_parallel_size", "bf16", "params_dtype", "pipeline_dtype", "autocast_dtype",
    "init_method_std", "perform_initialization", "init_method", "output_layer_init_method",
    "use_cpu_initialization", "masked_softmax_fusion", "persist_layer_norm",
    "gradient_accumulation_fusion",
)  # fmt: skip
_NORMS = {"RMSNorm": torch_layers.RMSNorm, "LayerNorm": torch_layers.LayerNorm}


def tower_config(
    lm_config: TransformerConfig, *, depth: int, hidden: int, heads: int, ffn: int,
    activation: str, gated: bool, normalization: str, eps: float, bias: bool = True,
) -> TransformerConfig:  # fmt: skip
    """The TransformerConfig of a tower's layers: its own shape, the language model's runtime.

    ``activation``: HF's hidden_act (a key of ACTIVATIONS); ``bias``: biases on every linear
    (QKV, proj, fc1, fc2: Qwen's, CLIP's and SigLIP's towers) or on none (Pixtral's).
    """
    act = ACTIVATIONS[activation]
    runtime = {name: getattr(lm_config, name) for name in _RUNTIME_FIELDS}
    return TransformerConfig(
        num_layers=depth,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        normalization=normalization,
        layernorm_epsilon=eps,
        gated_linear_unit=gated,
        activation_func=act,
        add_bias_linear=bias,
        add_qkv_bias=bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Megatron-Core fuses the bias into SiLU-gated and plain GELU MLPs only
        bias_activation_fusion=(
            lm_config.bias_activation_fusion and activation == "silu" and gated and bias
        ),
        apply_rope_fusion=False,
        pipeline_model_parallel_size=1,  # the whole tower sits on the first pipeline stage
        sequence_parallel=False,
        **runtime,
    )


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # transformers' QuickGELUActivation (CLIP's hidden_act "quick_gelu")
    return x * torch.sigmoid(1.702 * x)


# HF vision hidden_act -> the function Megatron-Core's MLP applies (also the CLIP / SigLIP
# pooling head's and LLaVA's projector's, models/llava/tower.py).
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh,
               "quick_gelu": _quick_gelu}  # fmt: skip


def layer_spec(normalization: str) -> ModuleSpec:
    """A pre-norm layer: norm, bidirectional self-attention, norm, MLP (torch spec pieces)."""
    norm = _NORMS[normalization]
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=torch_layers.SDPAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return ModuleSpec(
        module=torch_layers.TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


class TowerLayers(torch.nn.ModuleList):
    """The tower's TransformerLayers, ``blocks.N.`` in checkpoints, each layer's tensors
    sharded over TP as Megatron-Core shards them (a plain ModuleList's would be saved as
    replicated, every rank's half under one key).

    ``ffn_units``: the MLP's width in the HF model when ``config.ffn_hidden_size`` pads it
    (conversion/vit.py padded_ffn); fc1 and fc2 record it (``live_units``) so that LoRA
    (peft/lora.py) keeps its adapters off the padded units. The layers are what
    ``peft.vision_target_modules`` adapts."""

    def __init__(self, config: TransformerConfig, normalization: str, ffn_units: int | None = None):
        spec = layer_spec(normalization)
        super().__init__(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        for layer in self:
            if not config.gated_linear_unit:  # sharding.param_split: not [gate; up] halves
                for param in layer.mlp.linear_fc1.parameters():
                    param.plain_fc1 = True
            if ffn_units is not None and ffn_units < config.ffn_hidden_size:
                layer.mlp.linear_fc1.live_units = layer.mlp.linear_fc2.live_units = ffn_units

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for i, layer in enumerate(self):
            out.update(layer.sharded_state_dict(f"{prefix}{i}.", sharded_offsets, metadata))
        return out


def run_layer(layer, x: torch.Tensor, segments: PackedSeqParams, angles: torch.Tensor | None):
    """One layer on a tower's patches: x [patches, hidden] -> the same; attention within
    ``segments``; ``angles`` [patches, head_dim] the RoPE angles of each patch (None: no
    RoPE, as CLIP and SigLIP)."""
    out, _ = layer(
        x.unsqueeze(1),  # [s, b=1, h]
        attention_mask=None,
        rotary_pos_emb=None if angles is None else angles[:, None, None, :],  # [s, 1, 1, d]
        packed_seq_params=segments,
    )
    return out.squeeze(1)


@dataclasses.dataclass
class Segments(PackedSeqParams):
    """PackedSeqParams plus ``groups``: the segments grouped by length, (length, token
    positions [segments, length]) each, computed once per tower forward for every layer's
    attention (attention_ops.attend_in_segments)."""

    groups: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)


def segments(bounds: list[int], device=None) -> Segments:
    """Segments [bounds[i], bounds[i + 1]) of the patch sequence (cumulative patch counts);
    their grouping by length on ``device`` (where the patches are)."""
    cu = torch.tensor(bounds, dtype=torch.int32)  # on the CPU: read back without a sync
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return Segments(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
        max_seqlen_kv=longest, groups=attention_ops.segment_groups(bounds, device),
    )  # fmt: skip
