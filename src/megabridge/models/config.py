"""ModelConfig: what a model is, how it runs, and how it is split.

The bottom layer of megabridge: it imports nothing of megabridge but errors.py.
Every field declares its role next to its help string, and the rules that
depend on the role are derived from it here, never kept as lists elsewhere:

* ``architecture``: what the model is and computes (sizes, norms, RoPE, routing).
  A pretrained checkpoint sets these fields (``copy_architecture``) and a resume
  must match them (``architecture``, recorded in every checkpoint). Every field
  that changes the parameter set is one (tests/unit_tests/models/test_model_config_roles.py).
* ``runtime``: how this run computes it (dtype, kernels, recomputation,
  dropout): the recipe or the command line decides, a checkpoint never does.
* ``layout``: how it is split over processes (TP / PP / EP / SP). Checkpoints
  load at any layout, so a resume may change it.

An architecture field marked ``torch_only`` is built only by megabridge's torch
layer spec (models/specs.py says so when another spec is asked for).
``validate_model_config`` checks a config on its own, before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from megabridge.errors import ConfigError

ARCHITECTURE, RUNTIME, LAYOUT = "architecture", "runtime", "layout"


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through default_factory)."""
    kwargs: dict[str, Any] = {}
    if isinstance(default, list | dict):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
        default = dataclasses.MISSING
    return field(default=default, metadata={"help": help, **metadata}, **kwargs)


def architecture_field(default: Any, help: str, torch_only: bool = False) -> Any:
    return option(default, help, role=ARCHITECTURE, torch_only=torch_only)


def runtime_field(default: Any, help: str) -> Any:
    return option(default, help, role=RUNTIME)


def layout_field(default: Any, help: str) -> Any:
    return option(default, help, role=LAYOUT)


@dataclass
class ModelConfig:
    family: str = architecture_field("gpt", "model family (a folder under megabridge/models)")
    num_layers: int = architecture_field(2, "transformer layers")
    hidden_size: int = architecture_field(64, "hidden size")
    ffn_hidden_size: int = architecture_field(256, "MLP intermediate size (per expert for MoE)")
    num_attention_heads: int = architecture_field(4, "query heads")
    num_query_groups: int | None = architecture_field(
        None, "key/value heads (GQA); None: as many as heads"
    )
    kv_channels: int | None = architecture_field(None, "head dimension; None: hidden_size / heads")
    vocab_size: int = architecture_field(
        1024, "vocabulary size (padded to a multiple of the TP size)"
    )
    seq_length: int = architecture_field(128, "maximum sequence length the model is built for")
    normalization: Literal["RMSNorm", "LayerNorm"] = architecture_field("RMSNorm", "norm type")
    layernorm_epsilon: float = architecture_field(1e-5, "norm epsilon")
    layernorm_zero_centered_gamma: bool = architecture_field(
        False, "norm weight stored as w and applied as (1 + w), as in Gemma"
    )
    activation: Literal["swiglu", "gelu", "geglu", "relu", "squared_relu"] = architecture_field(
        "swiglu", "MLP activation (swiglu/geglu are gated)"
    )
    add_bias_linear: bool = architecture_field(False, "biases on all linear layers")
    add_qkv_bias: bool = architecture_field(False, "biases on the QKV projection only (Qwen2)")
    qk_layernorm: bool = architecture_field(False, "per-head RMSNorm on queries and keys (Qwen3)")
    norm_placement: Literal["pre", "post", "pre_post"] = architecture_field(
        "pre",
        "the attention and MLP norms: 'pre' on the sublayer input (Llama), 'post' on its output "
        "before the residual add (OLMo 2), 'pre_post' both (Gemma 2/3)",
        torch_only=True,
    )
    qk_norm_across_heads: bool = architecture_field(
        False,
        "RMSNorm on the whole query and key projections, all heads at once (OLMo 2); "
        "its weight spans the heads and is split over TP ranks with them",
        torch_only=True,
    )
    position_embedding_type: Literal["rope", "mrope", "learned_absolute", "none"] = (
        architecture_field("rope", "position embedding (mrope: RoPE over 3D positions, Qwen2.5-VL)")
    )
    mrope_section: list[int] | None = architecture_field(
        None,
        "mrope: how many RoPE frequencies follow the temporal, height and width positions "
        "(HF rope_parameters.mrope_section)",
    )
    mrope_interleaved: bool = architecture_field(
        False,
        "mrope: the height and width frequencies interleaved with the temporal ones (T H W T H "
        "W ...; Qwen3-VL's HF rope_parameters.mrope_interleaved) instead of in sections",
    )
    rotary_base: float = architecture_field(10000.0, "RoPE theta")
    rotary_percent: float = architecture_field(1.0, "fraction of the head dimension rotated")
    rotary_interleaved: bool = architecture_field(
        False,
        "RoPE rotates adjacent channel pairs (0, 1), (2, 3) ... (GLM-4) instead of the two "
        "halves of the rotated channels (Llama)",
    )
    rope_scaling: dict = architecture_field(
        {}, "HF rope_scaling / rope_parameters dict (llama3, linear, ...)"
    )
    rotary_attention_scaling: float | None = architecture_field(
        None,
        "multiply the rotated part of queries and keys by this after RoPE (transformers' "
        "attention_scaling of cos and sin: longrope's attention_factor); None: 1",
        torch_only=True,
    )
    share_embeddings_and_output_weights: bool = architecture_field(
        False, "tie input and output embeddings"
    )
    init_method_std: float = architecture_field(0.02, "std of the normal weight init")
    hidden_dropout: float = runtime_field(0.0, "dropout after attention and MLP")
    attention_dropout: float = runtime_field(0.0, "dropout on attention probabilities")
    # attention and embedding variants (Gemma 2/3 use all of them)
    softmax_scale: float | None = architecture_field(
        None, "attention score scale; None: 1/sqrt(kv_channels)"
    )
    sliding_window: int | None = architecture_field(
        None,
        "sliding-window attention: a token sees itself and the sliding_window - 1 tokens before "
        "it (HF's sliding_window); None: full causal attention",
        torch_only=True,
    )
    attn_logit_softcap: float | None = architecture_field(
        None, "soft-cap attention scores to cap * tanh(score / cap)", torch_only=True
    )
    final_logit_softcap: float | None = architecture_field(
        None, "soft-cap output logits to cap * tanh(logit / cap)"
    )
    attention_sinks: bool = architecture_field(
        False,
        "a learned logit per query head that joins every softmax and takes its share of the "
        "probability, attending to nothing (GPT-OSS; Megatron's softmax_type='learnable')",
        torch_only=True,
    )
    sliding_window_layers: list[int] | None = architecture_field(
        None, "0-based layers that use sliding_window; None: every layer"
    )
    local_rotary_base: float | None = architecture_field(
        None,
        "RoPE theta of the sliding-window layers (Gemma 3); None: rotary_base",
        torch_only=True,
    )
    latent_norm_epsilon: float | None = architecture_field(
        None,
        "epsilon of multi-latent attention's q/kv latent norms (transformers: always 1e-6); "
        "None: layernorm_epsilon",
        torch_only=True,
    )
    embedding_multiplier: float | None = architecture_field(
        None, "multiply token embeddings by this, in their dtype (Gemma: sqrt(hidden_size))"
    )
    no_rope_layers: list[int] | None = architecture_field(
        None, "0-based layers without RoPE (NoPE; SmolLM3: every 4th); None: RoPE everywhere"
    )
    attention_chunk_size: int | None = architecture_field(
        None,
        "chunked local attention: a token sees the earlier tokens of its own block of this many "
        "(blocks start at 0: Llama 4's attention_chunk_size); None: no chunks",
        torch_only=True,
    )
    chunked_attention_layers: list[int] | None = architecture_field(
        None, "0-based layers that use attention_chunk_size; None: every layer"
    )
    qk_l2_norm_layers: list[int] | None = architecture_field(
        None,
        "0-based layers whose query and key heads are RMS-normalised without a weight, after "
        "RoPE (Llama 4's use_qk_norm, on its RoPE layers); None: none",
        torch_only=True,
    )
    attn_temperature_scale: float | None = architecture_field(
        None,
        "on the NoPE layers (no_rope_layers), queries at position p are multiplied by "
        "1 + scale * log(1 + floor((p + 1) / attn_temperature_floor)) (Llama 4's attention "
        "temperature tuning); None: off",
        torch_only=True,
    )
    attn_temperature_floor: int | None = architecture_field(
        None, "the floor_scale of attn_temperature_scale (tokens)", torch_only=True
    )
    residual_multiplier: float | None = architecture_field(
        None,
        "multiply each attention and MLP output by this before its residual add (Granite)",
        torch_only=True,
    )
    logits_divisor: float | None = architecture_field(
        None, "divide the output logits by this (Granite's logits_scaling)"
    )
    # the clamped SwiGLU of GPT-OSS: (clamp(up) + offset) * g * sigmoid(alpha * g), g = clamp(gate)
    swiglu_alpha: float | None = architecture_field(
        None, "SwiGLU's gate is g * sigmoid(alpha * g) (GPT-OSS: 1.702); None: silu (alpha 1)"
    )
    glu_linear_offset: float = architecture_field(
        0.0, "added to the linear (up) half of a gated MLP before the product (GPT-OSS: 1)"
    )
    activation_clamp: float | None = architecture_field(
        None, "gated MLP: the gate clamped to at most this, the up half to [-this, this]"
    )
    bidirectional_image_attention: bool = architecture_field(
        False,
        "each image's tokens attend to each other both ways, text causally (Gemma 3's "
        "token_type_ids mask); the image tokens are those of vision['image_token_id']",
        torch_only=True,
    )
    vision: dict | None = architecture_field(
        None,
        "the vision tower of a vision-language model: its HF vision_config fields plus kind "
        "and image_token_id (models/vision.py); None: a text-only model",
    )
    # what a vision-language model's training leaves frozen (Megatron-Bridge's names)
    freeze_language_model: bool = runtime_field(
        False, "vision-language training: no gradients for the language model"
    )
    freeze_vision_model: bool = runtime_field(
        False, "vision-language training: no gradients for the vision tower (not its projection)"
    )
    freeze_vision_projection: bool = runtime_field(
        False, "vision-language training: no gradients for the projection of the tower's "
        "features into the language model (Qwen2.5-VL: the patch merger)"
    )  # fmt: skip
    # MoE
    num_moe_experts: int | None = architecture_field(
        None, "routed experts per MoE layer (None: dense)"
    )
    moe_router_topk: int = architecture_field(2, "experts each token is routed to")
    moe_ffn_hidden_size: int | None = architecture_field(
        None, "expert MLP size (None: ffn_hidden_size)"
    )
    moe_shared_expert_intermediate_size: int | None = architecture_field(
        None, "shared expert MLP size"
    )
    moe_router_pre_softmax: bool = architecture_field(
        False, "softmax before top-k (Mixtral: False)"
    )
    moe_aux_loss_coeff: float = architecture_field(0.0, "load-balancing loss coefficient")
    moe_router_load_balancing_type: str = architecture_field(
        "aux_loss", "aux_loss, seq_aux_loss or none"
    )
    moe_layer_freq: list[int] | None = architecture_field(
        None, "per layer: 1 for an MoE layer, 0 for a dense MLP (None: every layer MoE)"
    )
    moe_shared_expert_gate: bool = architecture_field(
        False, "sigmoid gate on the shared expert's output (Qwen2-MoE)"
    )
    moe_router_score_function: Literal["softmax", "sigmoid"] = architecture_field(
        "softmax", "router score function (DeepSeek-V3: sigmoid)"
    )
    moe_router_topk_scaling_factor: float | None = architecture_field(
        None, "multiplies the routed experts' weights (DeepSeek-V3's routed_scaling_factor)"
    )
    moe_router_enable_expert_bias: bool = architecture_field(
        False, "per-expert bias on the scores used for selection only (aux-loss-free balancing)"
    )
    moe_router_num_groups: int | None = architecture_field(
        None, "expert groups for group-limited routing"
    )
    moe_router_group_topk: int | None = architecture_field(None, "groups each token may route to")
    moe_router_group_score: Literal["top_sum", "max"] = architecture_field(
        "top_sum",
        "how groups are ranked: by the sum of their top (topk / group_topk) scores "
        "(Megatron-Core, DeepSeek-V3) or by their best score (DeepSeek-V2's group_limited_greedy)",
    )
    moe_apply_probs_on_input: bool = architecture_field(
        False,
        "multiply the routed expert's input, not its output, by the router weight (Llama 4; "
        "Megatron-Core allows it with moe_router_topk 1 only)",
    )
    moe_router_dtype: Literal["fp32", "fp64"] | None = runtime_field(
        None, "router logits and weights in this precision (None: the model's)"
    )
    # Multi-latent attention (DeepSeek-V2/V3): low-rank compressed queries and keys/values
    multi_latent_attention: bool = architecture_field(
        False, "multi-latent attention (DeepSeek-V2/V3)"
    )
    q_lora_rank: int | None = architecture_field(
        None, "MLA: query compression rank (None: no compression)"
    )
    kv_lora_rank: int = architecture_field(512, "MLA: key/value compression rank")
    qk_head_dim: int = architecture_field(128, "MLA: query/key head dimension without RoPE")
    qk_pos_emb_head_dim: int = architecture_field(64, "MLA: query/key head dimension with RoPE")
    v_head_dim: int = architecture_field(128, "MLA: value head dimension")
    # parallelism and precision
    tensor_model_parallel_size: int = layout_field(1, "tensor-parallel size")
    pipeline_model_parallel_size: int = layout_field(1, "pipeline-parallel size")
    expert_model_parallel_size: int = layout_field(1, "expert-parallel size (MoE)")
    sequence_parallel: bool = layout_field(False, "sequence parallelism (needs TP > 1)")
    bf16: bool | None = runtime_field(None, "bf16 weights and compute; None: on GPU yes, on CPU no")
    transformer_impl: Literal["auto", "transformer_engine", "torch", "local"] = runtime_field(
        "auto",
        "layer implementation: auto (TE if importable, else torch), transformer_engine, torch "
        "(SDPA attention, megabridge's fast spec) or local (megatron-core's unfused spec)",
    )
    fp8: Literal["tensorwise", "rowwise"] | None = runtime_field(
        None,
        "FP8 GEMMs in the torch spec's block linears (torch._scaled_mm, no Transformer Engine): "
        "tensorwise or rowwise scaling; needs a GPU of compute capability 8.9+",
    )
    first_last_layers_bf16: bool = runtime_field(
        False,
        "with model.fp8: the first num_layers_at_start_in_bf16 and the last "
        "num_layers_at_end_in_bf16 transformer layers keep bf16 GEMMs (Megatron-Core's names; "
        "without model.fp8 it changes nothing)",
    )
    num_layers_at_start_in_bf16: int = runtime_field(
        1, "layers at the model's start kept in bf16 by first_last_layers_bf16"
    )
    num_layers_at_end_in_bf16: int = runtime_field(
        1, "layers at the model's end kept in bf16 by first_last_layers_bf16"
    )
    recompute_swiglu: bool | None = runtime_field(
        None,
        "torch spec, dense SwiGLU MLPs: recompute SwiGLU's output in backward instead of keeping "
        "it (16 KB less activation memory per token and layer at FFN 8192, for one element-wise "
        "write); None: wherever it applies (not with FP8 or compiled layers), true: required "
        "(with FP8 too)",
    )
    recompute_cross_entropy: bool = runtime_field(
        True,
        "the loss keeps the logits for backward and recomputes the softmax from them, instead "
        "of keeping an fp32 softmax [tokens, vocab] (same loss and gradients; on the GPU also "
        "faster than Megatron-Core's fused cross entropy); false: Megatron-Core's",
    )
    gradient_accumulation_fusion: bool = runtime_field(
        True,
        "on the GPU, each linear's weight-gradient GEMM accumulates into DDP's fp32 gradient "
        "buffer itself (torch.addmm with out_dtype=float32, Megatron-Core's "
        "gradient_accumulation_fusion without Apex) instead of returning a bf16 gradient that a "
        "hook adds in; no effect on the CPU",
    )
    compile_layers: bool = runtime_field(
        False,
        "torch spec: compile each transformer layer with torch.compile (fused element-wise "
        "work, fewer kept activations; the first steps take longer while it compiles)",
    )
    recompute_granularity: Literal["full", "selective"] | None = runtime_field(
        None, "activation recomputation"
    )
    recompute_method: Literal["uniform", "block"] | None = runtime_field(None, "for full recompute")
    recompute_modules: list[str] | None = runtime_field(
        None,
        "selective recompute (implies recompute_granularity=selective): Megatron-Core's parts "
        "to recompute in backward, e.g. [layernorm] (the norms before attention and MLP: their "
        "outputs are not kept); also core_attn, mlp, moe, shared_experts, mla_up_proj. "
        "None: with recompute_granularity=selective, Megatron's [core_attn]",
    )
    recompute_num_layers: int | None = runtime_field(None, "layers per recompute unit / block")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def chunk_of_layer(self, layer: int) -> int | None:
        """The attention chunk size of 0-based ``layer``; None: attention is not chunked."""
        if self.attention_chunk_size is None:
            return None
        if self.chunked_attention_layers is None or layer in self.chunked_attention_layers:
            return self.attention_chunk_size
        return None

    def window_of_layer(self, layer: int) -> int | None:
        """The sliding window of 0-based ``layer``; None: full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None


def expert_tensor_parallel_size(cfg: ModelConfig) -> int:
    """How many ranks split each expert: Megatron-Core's default, the TP size, except for
    experts with biases (GPT-OSS), which it supports only whole (expert TP 1: every TP rank
    holds its experts whole; transformer_config.py asserts "Bias in Moe is only supported
    when ETP==1")."""
    if cfg.num_moe_experts and cfg.add_bias_linear:
        return 1
    return cfg.tensor_model_parallel_size


def fields_with_role(role: str) -> tuple[str, ...]:
    """The names of the ModelConfig fields that declare ``role``, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata["role"] == role)


def torch_only_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("torch_only"))


def architecture(cfg: ModelConfig) -> dict:
    """The architecture fields, with defaults resolved (kv_channels None == hidden / heads)."""
    data = {name: copy.deepcopy(getattr(cfg, name)) for name in fields_with_role(ARCHITECTURE)}
    data["num_query_groups"] = data["num_query_groups"] or data["num_attention_heads"]
    data["kv_channels"] = data["kv_channels"] or data["hidden_size"] // data["num_attention_heads"]
    if data["num_moe_experts"]:
        data["moe_ffn_hidden_size"] = data["moe_ffn_hidden_size"] or data["ffn_hidden_size"]
    return data


def copy_architecture(source: ModelConfig, target: ModelConfig) -> None:
    """Make ``target`` the model ``source`` is, keeping its runtime and layout fields."""
    for name in fields_with_role(ARCHITECTURE):
        setattr(target, name, copy.deepcopy(getattr(source, name)))


def model_config_from_dict(data: dict) -> ModelConfig:
    """A ModelConfig from a saved dict (a checkpoint's; fields it does not know are dropped)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in names})


# Sizes that must be positive integers (None, where allowed, means "derived"); checked first,
# since every divisibility rule below divides by some of them.
_POSITIVE_SIZES = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "seq_length", "num_moe_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "expert_model_parallel_size",
)  # fmt: skip


def _size_problems(cfg: ModelConfig) -> list[str]:
    problems = []
    for name in _POSITIVE_SIZES:
        value = getattr(cfg, name)
        if value is None and name in ("num_query_groups", "kv_channels", "num_moe_experts",
                                      "moe_ffn_hidden_size"):  # fmt: skip
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive integer")
    if not problems and cfg.kv_channels is None and cfg.hidden_size % cfg.num_attention_heads:
        problems.append(
            f"hidden_size={cfg.hidden_size} is not divisible by num_attention_heads="
            f"{cfg.num_attention_heads} (or set kv_channels, the head dimension)"
        )
    return problems


def validate_model_config(cfg: ModelConfig) -> None:
    problems = _size_problems(cfg)
    if problems:
        raise ConfigError("model: " + "; ".join(problems))
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    problems = []
    if heads % groups:
        problems.append(
            f"num_attention_heads={heads} is not a multiple of num_query_groups={groups}"
        )
    if groups % tp:
        problems.append(
            f"num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}"
        )
    if cfg.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={cfg.ffn_hidden_size} is not divisible by TP={tp}")
    if cfg.num_layers % pp:
        problems.append(
            f"num_layers={cfg.num_layers} is not divisible by pipeline_model_parallel_size={pp}"
        )
    if cfg.qk_layernorm and cfg.qk_norm_across_heads:
        problems.append("qk_layernorm (per head) and qk_norm_across_heads exclude each other")
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        problems.append(f"sliding_window={cfg.sliding_window} must be at least 1")
    if cfg.sequence_parallel and tp == 1:
        problems.append("sequence_parallel needs tensor_model_parallel_size > 1")
    if cfg.num_moe_experts and cfg.num_moe_experts % cfg.expert_model_parallel_size:
        problems.append(
            f"num_moe_experts={cfg.num_moe_experts} is not divisible by "
            f"expert_model_parallel_size={cfg.expert_model_parallel_size}"
        )
    if cfg.moe_layer_freq is not None and len(cfg.moe_layer_freq) != cfg.num_layers:
        problems.append(
            f"moe_layer_freq has {len(cfg.moe_layer_freq)} entries for num_layers={cfg.num_layers}"
        )
    problems += _variant_problems(cfg)
    if problems:
        raise ConfigError("model: " + "; ".join(problems))


def _variant_problems(cfg: ModelConfig) -> list[str]:
    problems = []
    for name in ("softmax_scale", "attn_logit_softcap", "final_logit_softcap", "sliding_window",
                 "logits_divisor"):  # fmt: skip
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            problems.append(f"{name}={value} must be positive")
    bad = [i for i in cfg.sliding_window_layers or [] if not 0 <= i < cfg.num_layers]
    if bad:
        problems.append(
            f"sliding_window_layers {bad} are not layers of a {cfg.num_layers}-layer model"
        )
    bad = [i for i in cfg.no_rope_layers or [] if not 0 <= i < cfg.num_layers]
    if bad:
        problems.append(f"no_rope_layers {bad} are not layers of a {cfg.num_layers}-layer model")
    problems += _llama4_attention_problems(cfg)
    problems += _recompute_problems(cfg)
    problems += _bf16_layer_problems(cfg)
    if (cfg.swiglu_alpha is not None or cfg.glu_linear_offset) and cfg.activation != "swiglu":
        problems.append("swiglu_alpha and glu_linear_offset need activation=swiglu")
    if cfg.local_rotary_base is not None and cfg.sliding_window is None:
        problems.append("local_rotary_base needs sliding_window (it is the window layers' theta)")
    if (cfg.position_embedding_type == "mrope") != (cfg.mrope_section is not None):
        problems.append("position_embedding_type=mrope and mrope_section go together")
    if cfg.mrope_interleaved and cfg.position_embedding_type != "mrope":
        problems.append("mrope_interleaved needs position_embedding_type=mrope")
    if cfg.vision is not None and cfg.sequence_parallel:
        problems.append("sequence_parallel with a vision tower is not supported yet")
    # the tower's heads are split over TP with the language model's (models/vision_encoder.py);
    # Qwen's vision_config names them num_heads, CLIP's and SigLIP's num_attention_heads
    tower_heads = (cfg.vision or {}).get("num_heads", (cfg.vision or {}).get("num_attention_heads"))
    if tower_heads and tower_heads % cfg.tensor_model_parallel_size:
        problems.append(
            f"the vision tower's {tower_heads} attention heads are not divisible by "
            f"tensor_model_parallel_size={cfg.tensor_model_parallel_size}"
        )
    if cfg.bidirectional_image_attention and cfg.vision is None:
        problems.append("bidirectional_image_attention needs a vision tower (model.vision)")
    return problems


def _llama4_attention_problems(cfg: ModelConfig) -> list[str]:
    """Chunked attention, the weightless QK norm, temperature tuning and probabilities on the
    experts' input (Llama 4)."""
    problems = []
    chunk = cfg.attention_chunk_size
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        problems.append(f"attention_chunk_size={chunk!r} must be a positive integer")
    if cfg.attn_temperature_floor is not None and cfg.attn_temperature_floor <= 0:
        problems.append(f"attn_temperature_floor={cfg.attn_temperature_floor} must be positive")
    for name in ("chunked_attention_layers", "qk_l2_norm_layers"):
        bad = [i for i in getattr(cfg, name) or [] if not 0 <= i < cfg.num_layers]
        if bad:
            problems.append(f"{name} {bad} are not layers of a {cfg.num_layers}-layer model")
    if cfg.attn_temperature_scale is not None and cfg.attn_temperature_floor is None:
        problems.append("attn_temperature_scale needs attn_temperature_floor")
    if cfg.moe_apply_probs_on_input and cfg.num_moe_experts and cfg.moe_router_topk != 1:
        problems.append(
            f"moe_apply_probs_on_input needs moe_router_topk=1 (got {cfg.moe_router_topk})"
        )
    return problems


def _bf16_layer_problems(cfg: ModelConfig) -> list[str]:
    return [
        f"{name}={getattr(cfg, name)} must be between 0 and num_layers={cfg.num_layers}"
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")
        if not 0 <= getattr(cfg, name) <= cfg.num_layers
    ]


def layer_in_bf16(cfg: ModelConfig, layer: int) -> bool:
    """Whether 0-based global ``layer`` keeps bf16 GEMMs under model.fp8 (first_last_layers_bf16)."""
    if not cfg.first_last_layers_bf16:
        return False
    return layer < cfg.num_layers_at_start_in_bf16 or (
        layer >= cfg.num_layers - cfg.num_layers_at_end_in_bf16
    )


# Megatron-Core 0.16's recompute_modules, less "moe_act" (it needs grouped GEMMs, which
# megabridge's MoE layers do not use).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts", "mla_up_proj")


def _recompute_problems(cfg: ModelConfig) -> list[str]:
    modules = cfg.recompute_modules
    if modules is None:
        return []
    if cfg.recompute_granularity == "full":
        return ["recompute_modules is for recompute_granularity=selective, not full"]
    problems = []
    unknown = [m for m in modules if m not in RECOMPUTE_MODULES]
    if unknown:
        problems.append(f"recompute_modules {unknown} are not among {', '.join(RECOMPUTE_MODULES)}")
    if "layernorm" in modules and cfg.fp8 is not None:
        # FP8 linears keep FP8 copies of the norm outputs, not the outputs themselves.
        problems.append("recompute_modules=[layernorm] with model.fp8 is not supported yet")
    if "layernorm" in modules and cfg.compile_layers:
        problems.append("recompute_modules=[layernorm] with compile_layers is not supported yet")
    return problems


def recompute_granularity(cfg: ModelConfig) -> str | None:
    """recompute_granularity, where recompute_modules alone means selective."""
    if cfg.recompute_granularity is None and cfg.recompute_modules:
        return "selective"
    return cfg.recompute_granularity
