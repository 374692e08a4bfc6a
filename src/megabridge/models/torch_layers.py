"""megabridge's torch-native layer spec: fast without Transformer Engine.

Megatron-Core's local spec materialises the [b, heads, s, s] score matrix and
its mask; this spec uses torch's scaled_dot_product_attention (flash /
memory-efficient kernels on GPU) with ``is_causal`` and native GQA, and runs
packed (THD) sequences segment by segment, so no s x s mask ever exists.
Parameter names are those of the local spec, so conversion mappings and
checkpoints are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megabridge.errors import ConfigError


class SDPAttention(MegatronModule):
    """Core attention (softmax(QK^T) V) through F.scaled_dot_product_attention.

    Same constructor and call signature as megatron-core's DotProductAttention.
    query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn];
    packed THD: query [t, np, hn] -> [t, np * hn].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,  # multi-latent attention: key and value head dims
        v_channels: int | None = None,  # differ; SDPA takes them from the tensors
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("context parallelism is not supported yet by the torch layer spec")
        if config.window_size is not None:
            raise ConfigError("sliding-window attention is not supported yet by the torch spec")
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(hn), SDPA's default

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [b, np, s, hn], k/v [b, ng, s, hn]
        if self.groups != self.heads:
            if q.device.type == "cpu":
                # enable_gqa is not taken by every CPU kernel; repeat instead.
                rep = self.heads // self.groups
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=self._p(), scale=self.softmax_scale
                )
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                dropout_p=self._p(),
                scale=self.softmax_scale,
                enable_gqa=True,
            )
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self._p(), scale=self.softmax_scale
        )

    def _p(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ConfigError("attention bias is not supported by the torch layer spec")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v)  # [b, np, sq, hn]
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _forward_packed(self, query, key, value, params):
        # THD: [t, n, hn]; each segment attends causally to itself only.
        bounds = params.cu_seqlens_q.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end <= start:
                continue
            q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            outs.append(self._sdpa(q, k, v)[0].transpose(0, 1))  # [len, np, hn]
        t = query.shape[0]
        out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, self.heads, query.shape[-1])
        if out.shape[0] < t:  # padding after the last segment
            out = torch.cat([out, out.new_zeros(t - out.shape[0], *out.shape[1:])])
        return out.reshape(t, -1)


class RMSNorm(torch.nn.Module):
    """RMSNorm with an optional zero-centred weight (Gemma applies 1 + w).

    Normalises in float32 and casts back, as transformers does.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1.0 if self.zero_centered else self.weight
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return y * weight


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        if config.layernorm_zero_centered_gamma:
            raise ConfigError("zero-centred LayerNorm is not supported yet")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def norm_class(cfg):
    return RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm


def block_spec(cfg, tconfig):
    """Megatron-Core's local block spec with SDPA attention and megabridge's norms swapped in.

    A whole-block spec, so that the final norm is megabridge's too. Layers are
    dense or MoE as ``moe_layer_freq`` says (megatron-core reads it from tconfig).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layer_specs = get_gpt_decoder_layer_specs(
        tconfig, use_transformer_engine=False, normalization=cfg.normalization
    )
    norm = norm_class(cfg)
    for spec in {id(s): s for s in layer_specs}.values():  # the dense and the MoE spec
        _use_megabridge_modules(spec, cfg, norm)
    offset = get_transformer_layer_offset(tconfig)
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + get_num_layers_to_build(tconfig)],
        layer_norm=norm,
    )


def _use_megabridge_modules(spec, cfg, norm) -> None:
    sub = spec.submodules
    sub.input_layernorm = norm
    sub.pre_mlp_layernorm = norm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if cfg.qk_layernorm:  # multi-latent attention has q_layernorm and kv_layernorm
        for field in ("q_layernorm", "k_layernorm", "kv_layernorm"):
            if hasattr(attn, field):
                setattr(attn, field, norm)
