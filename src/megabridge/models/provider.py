"""ModelConfig -> Megatron-Core TransformerConfig -> GPTModel on this rank.

Config is data (models/config.py); building happens here, once, for every
family. A family that needs a different module says so through ModelConfig
fields that the layer spec reads, never through code here.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from megabridge.errors import ConfigError
from megabridge.models import (
    compiled,
    cross_entropy,
    fp8,
    hooks,
    residual_norm,
    rope,
    specs,
    torch_layers,
    vision,
)
from megabridge.models.config import (
    ModelConfig,
    expert_tensor_parallel_size,
    recompute_granularity,
    validate_model_config,
)

_ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "geglu": (functools.partial(F.gelu, approximate="tanh"), True),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "squared_relu": (lambda x: torch.pow(F.relu(x), 2), False),
}


def _set_later(weight: torch.Tensor) -> torch.Tensor:
    return weight


def padded_vocab_size(cfg: ModelConfig) -> int:
    """Vocab rows in the Megatron embedding: the HF vocab, padded only when TP needs it.

    Padding changes the softmax's denominator (a padded row is one more class), so
    we pad only when vocab_size is not divisible by the TP size.
    """
    tp = cfg.tensor_model_parallel_size
    return math.ceil(cfg.vocab_size / tp) * tp


def use_bf16(cfg: ModelConfig) -> bool:
    return torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16


def transformer_config(cfg: ModelConfig):
    """The Megatron-Core TransformerConfig for ``cfg`` (built here, never stored in configs)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    activation, gated = _ACTIVATIONS[cfg.activation]
    if cfg.swiglu_alpha is not None:
        activation = functools.partial(_sigmoid_gated, alpha=cfg.swiglu_alpha)
    bf16 = use_bf16(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe = {}
    if cfg.num_moe_experts:
        moe = dict(
            num_moe_experts=cfg.num_moe_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
            moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
            moe_router_pre_softmax=cfg.moe_router_pre_softmax,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
            moe_layer_freq=cfg.moe_layer_freq if cfg.moe_layer_freq is not None else 1,
            moe_shared_expert_gate=cfg.moe_shared_expert_gate,
            moe_router_score_function=cfg.moe_router_score_function,
            moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
            moe_router_num_groups=cfg.moe_router_num_groups,
            moe_router_group_topk=cfg.moe_router_group_topk,
            moe_router_dtype=cfg.moe_router_dtype,
            moe_apply_probs_on_input=cfg.moe_apply_probs_on_input,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            # Dropless: every token reaches its top-k experts (no capacity, no dropping).
            moe_expert_capacity_factor=None,
        )
    fusions = _gpu_fusions(cfg)
    recompute = {}
    if recompute_granularity(cfg):
        recompute = dict(
            recompute_granularity=recompute_granularity(cfg),
            recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers,
        )
        if cfg.recompute_modules is not None:
            modules, impl = list(cfg.recompute_modules), specs.resolve_impl(cfg)
            if impl == "torch":  # the spec does it (models/norm_recompute.py)
                modules = [m for m in modules if m != "layernorm"]
            elif "layernorm" in modules and not specs.have_transformer_engine():
                # Megatron-Core's own fails without TE (models/norm_recompute.py says why).
                raise ConfigError(
                    f"model.recompute_modules=[layernorm] is not supported yet by the {impl} "
                    "spec without Transformer Engine; use model.transformer_impl=torch"
                )
            recompute["recompute_modules"] = modules
    config_class, mla = TransformerConfig, mla_fields(cfg)
    if mla:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_class = MLATransformerConfig
    return config_class(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        layernorm_zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        gated_linear_unit=gated,
        activation_func=activation,
        glu_linear_offset=cfg.glu_linear_offset,
        activation_func_clamp_value=cfg.activation_clamp,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        rotary_interleaved=cfg.rotary_interleaved,
        softmax_scale=cfg.softmax_scale,
        no_rope_freq=_no_rope_pattern(cfg),
        mrope_section=cfg.mrope_section,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        expert_model_parallel_size=cfg.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(cfg),
        sequence_parallel=cfg.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # Weights are set by megabridge (models/init.py or a pretrained checkpoint)
        # after building, identically for every parallel layout. Megatron's own
        # init pass still runs, with a no-op init method: it is what records each
        # parameter's tensor-parallel layout (tensor_model_parallel, partition_dim).
        perform_initialization=True,
        init_method=_set_later,
        output_layer_init_method=_set_later,
        use_cpu_initialization=False,
        # Per-token loss: the mean over all tokens of the global batch, however it
        # is split into micro-batches (packed and unpacked SFT agree).
        calculate_per_token_loss=True,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        **fusions,
        **moe,
        **recompute,
        **mla,
    )


def _no_rope_pattern(cfg: ModelConfig) -> list[int] | None:
    """Megatron-Core's no_rope_freq as a list: 1 for a layer that skips RoPE (NoPE)."""
    if not cfg.no_rope_layers:
        return None
    return [int(i in cfg.no_rope_layers) for i in range(cfg.num_layers)]


def _sigmoid_gated(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPT-OSS's gate, x * sigmoid(alpha * x), in transformers' order of operations."""
    return x * torch.sigmoid(x * alpha)


def _gpu_fusions(cfg: ModelConfig) -> dict:
    """The fused kernels, for the torch spec on GPU (off on CPU: exact numerics).

    RoPE and the dense MLP's SwiGLU are megabridge's Triton kernels (models/triton_kernels.py,
    through torch_layers.fused_rope and Megatron's activation-module slot); other SwiGLUs and
    Megatron's own cross entropy (model.recompute_cross_entropy=false) are compiled by
    Megatron-Core itself (jit_fuser = torch.compile).
    """
    on = torch.cuda.is_available() and specs.resolve_impl(cfg) == "torch"
    if on and cfg.position_embedding_type == "rope":
        torch_layers.install_fused_rope()
    # The dense MLP's SwiGLU as megabridge's Triton module (torch_layers.triton_swiglu says
    # when), through Megatron's activation-module slot; else Megatron's compiled one.
    own_swiglu = on and torch_layers.triton_swiglu(cfg)
    return dict(
        use_te_activation_func=own_swiglu,
        # Megatron fuses only plain silu SwiGLU (no alpha, offset or clamp).
        bias_activation_fusion=on and not own_swiglu and torch_layers.plain_swiglu(cfg),
        # torch_layers.fused_rope rotates halves only: interleaved RoPE (GLM-4) stays unfused.
        apply_rope_fusion=on
        and cfg.position_embedding_type == "rope"
        and not cfg.multi_latent_attention
        and not cfg.rotary_interleaved,
        cross_entropy_loss_fusion=on,
        cross_entropy_fusion_impl="native",
    )


def mla_fields(cfg: ModelConfig) -> dict:
    """MLATransformerConfig's own fields: latent sizes, and its RoPE (plain or YaRN)."""
    if not cfg.multi_latent_attention:
        return {}
    fields = dict(
        multi_latent_attention=True,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_head_dim,
        qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim,
        v_head_dim=cfg.v_head_dim,
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
    )
    rope = cfg.rope_scaling or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        # MLA's softmax scale is mscale(factor, mscale_all_dim)^2 / sqrt(d): 1 / sqrt(d) here.
        return {**fields, "rope_type": "rope", "rotary_scaling_factor": 1.0, "mscale_all_dim": 0.0}
    if kind == "yarn":
        return {
            **fields,
            "rope_type": "yarn",
            "rotary_scaling_factor": float(rope["factor"]),
            "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            "beta_fast": float(rope.get("beta_fast") or 32),
            "beta_slow": float(rope.get("beta_slow") or 1),
            "mscale": float(rope.get("mscale") or 1.0),
            "mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        }
    raise ConfigError(f"multi-latent attention supports rope_type default or yarn, not {kind!r}")


def _megatron_without_te() -> None:
    """Work around two megatron-core 0.16 modules that misjudge a missing TE.

    * moe/moe_utils.py imports ``te_general_gemm`` inside ``try: import
      transformer_engine``, yet the MoE router's gating reads it unconditionally
      (``if te_general_gemm is not None``): a NameError without TE. Defined as
      None, the router takes its torch.mm path.
    * multi_latent_attention.py sets ``HAVE_TE = True`` whenever
      ``megatron.core.extensions.transformer_engine`` imports, which it does
      without TE too, exporting MagicMock placeholders for TELinear & co; MLA's
      constructor then fails on ``isinstance(linear_proj, TELinear)``. Its flag is
      set to what it means: TE is not there.
    """
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    multi_latent_attention.HAVE_TE = False


def layer_spec(cfg, tconfig):
    impl = specs.resolve_impl(cfg)
    if not specs.have_transformer_engine():
        _megatron_without_te()
    if cfg.fp8 is not None and impl != "torch":
        raise ConfigError(
            f"model.fp8 is built by the torch layer spec only, not {impl}; "
            "set model.transformer_impl=torch"
        )
    if impl == "torch":
        return torch_layers.block_spec(cfg, tconfig)
    # Megatron-Core's own block spec: a dense or an MoE layer per moe_layer_freq.
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(
        tconfig,
        use_transformer_engine=impl == "transformer_engine",
        normalization=cfg.normalization,
    )


def build_model(cfg: ModelConfig, meta: bool = False) -> list[torch.nn.Module]:
    """The model chunks of this pipeline rank (one chunk: no virtual pipeline yet).

    ``meta``: shapes and dtypes only, no memory (tensors on the meta device), e.g.
    to learn a checkpoint's layout without materialising the model.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    validate_model_config(cfg)
    if cfg.compile_layers:
        compiled.check_compile_supported(specs.resolve_impl(cfg), cfg.fp8)
    if cfg.fp8 is not None and not meta:  # a meta build only lays out the (same) parameters
        fp8.check_fp8_supported(cfg.fp8, cfg.tensor_model_parallel_size, cfg.sequence_parallel)
    tconfig = transformer_config(cfg)
    # A vision-language model is a GPTModel with a vision tower on its first stage.
    model_class, extra = GPTModel, {}
    if cfg.vision is not None:
        model_class = vision.VisionLanguageModel
        extra = {"vision": cfg.vision, "bidirectional_images": cfg.bidirectional_image_attention}
    with _OnMeta() if meta else contextlib.nullcontext():
        model = model_class(
            config=tconfig,
            transformer_layer_spec=layer_spec(cfg, tconfig),
            vocab_size=padded_vocab_size(cfg),
            max_sequence_length=cfg.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type=cfg.position_embedding_type,
            rotary_percent=cfg.rotary_percent,
            rotary_base=cfg.rotary_base,
            **extra,
        )
        rope.apply_rope_scaling(model, cfg)
        vision.apply_interleaved_mrope(model, cfg)
        hooks.apply(model, cfg)
        if residual_norm.applies(cfg):
            residual_norm.fuse_residual_norms(model)
        if cfg.recompute_cross_entropy and getattr(model, "post_process", False):
            cross_entropy.install(model)
    if meta:
        model.to(dtype=tconfig.params_dtype)
    else:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else "cpu"
        )
        # Like Megatron-LM's Float16Module: every parameter in the model's dtype, including
        # the few megatron-core creates in fp32 (learned position embeddings).
        model.to(device=device, dtype=tconfig.params_dtype)
        if cfg.compile_layers:
            compiled.compile_layers(model)
    model.megabridge_config = cfg  # what conversion and checkpoints need to know about it
    return [model]


_FACTORIES = frozenset({
    torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.arange,
    torch.empty_strided, torch.tensor, torch.linspace,
})  # fmt: skip


class _OnMeta(TorchFunctionMode):
    """Every tensor created while active lives on the meta device, whatever device was asked for;
    moves to another device are dropped (meta tensors have no data to move)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES:
            kwargs["device"] = "meta"
        elif func is torch.Tensor.cuda or func is torch.Tensor.cpu:
            return args[0]
        elif func is torch.Tensor.to:
            kwargs.pop("device", None)
            args = (args[0], *(a for a in args[1:] if not isinstance(a, (str, int, torch.device))))
        return func(*args, **kwargs)
