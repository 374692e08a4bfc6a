"""megabridge's torch-native layer spec: fast without Transformer Engine.

Megatron-Core's local spec materialises the [b, heads, s, s] score matrix and
its mask; this spec uses torch's scaled_dot_product_attention (flash /
memory-efficient kernels on GPU) with ``is_causal`` and native GQA, and runs
packed (THD) sequences segment by segment, so no s x s mask ever exists.
Parameter names are those of the local spec, so conversion mappings and
checkpoints are shared.

It also builds what Megatron-Core's specs do not: sliding-window attention
(a mask only for sequences longer than the window), norms on the attention /
MLP outputs (PostNormLayer, ModelConfig.norm_placement) and a q/k norm over
all heads at once (AcrossHeadsRMSNorm, ModelConfig.qk_norm_across_heads).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
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
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ConfigError("context parallelism is not supported yet by the torch layer spec")
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import is_layer_window_attention

        self.window_left = None  # a query sees itself and this many keys before it
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            if config.window_size[1] != 0:
                raise ConfigError("the torch spec supports only causal (left) attention windows")
            self.window_left = config.window_size[0]

        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(hn), SDPA's default

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [b, np, s, hn], k/v [b, ng, s, hn]
        mask = self._window_mask(q.shape[-2], k.shape[-2], q.device)
        kwargs = dict(
            attn_mask=mask, is_causal=mask is None, dropout_p=self._p(), scale=self.softmax_scale
        )
        if self.groups != self.heads:
            if q.device.type == "cpu":
                # enable_gqa is not taken by every CPU kernel; repeat instead.
                rep = self.heads // self.groups
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            else:
                kwargs["enable_gqa"] = True
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _window_mask(self, sq: int, sk: int, device) -> torch.Tensor | None:
        """[sq, sk] True where a query may attend under a sliding window; None: plain causal.

        Only sequences longer than the window need it (and pay for an s x s mask).
        """
        if self.window_left is None or sk <= self.window_left + 1:
            return None
        i = torch.arange(sk - sq, sk, device=device)[:, None]  # query positions
        j = torch.arange(sk, device=device)[None, :]
        return (j <= i) & (j >= i - self.window_left)

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
        if x.dtype == torch.float32 or x.is_cuda:
            # One fused kernel on GPU (it accumulates in fp32 internally); on the CPU in
            # fp32 this is exactly transformers' order of operations.
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


def _rope_bshd(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # t [s, b, n, d], freqs [s, 1, 1, rot]: the rotate-half RoPE in one fused pass.
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x * cos + rotated * sin, rest), dim=-1)


_compiled_rope = None


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE as one compiled kernel forward and backward (Megatron's fused-RoPE signature)."""
    global _compiled_rope
    if interleaved:
        raise ConfigError("interleaved RoPE is not supported by the torch layer spec")
    if _compiled_rope is None:
        _compiled_rope = torch.compile(_rope_bshd, dynamic=False)
    return _compiled_rope(t, freqs)


def rope_thd(t, cu_seqlens, freqs, cp_size: int = 1, cp_rank: int = 0):
    """Packed (THD) RoPE: Megatron-Core's own per-segment implementation."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd

    return _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs)


def install_fused_rope() -> None:
    """Give Megatron-Core's RoPE dispatcher a fused implementation without Transformer Engine.

    rope_utils looks up ``fused_apply_rotary_pos_emb(_thd)`` (TE's, when TE is
    installed) whenever ``config.apply_rope_fusion`` is set; without TE they are
    None. The torch spec on GPU fills them with a compiled kernel.
    """
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = rope_thd


class _SumOverTP(torch.autograd.Function):
    """All-reduce (sum) over the tensor-parallel group, forward and backward.

    Every rank's output depends on every rank's input, so each input's gradient
    is the sum of what all ranks send back (unlike Megatron's
    reduce_from_tensor_model_parallel_region, whose backward is the identity).
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class AcrossHeadsRMSNorm(torch.nn.Module):
    """RMSNorm over a whole query or key projection, all heads at once (OLMo 2's q_norm/k_norm).

    Megatron-Core calls it where it calls a per-head q/k layernorm, on
    [..., heads_here, hn]. The weight [heads * hn] is split over tensor-parallel
    ranks like the heads (rank r holds its heads' slice), and the mean square is
    summed over the ranks. ``heads``: "query" or "key" (which projection).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, heads: str = "query", **_):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        self.group = parallel_state.get_tensor_model_parallel_group()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        total = config.num_attention_heads if heads == "query" else config.num_query_groups
        self.width, self.eps, self.tp = total * hidden_size, eps, tp
        local = divide(total, tp) * hidden_size
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], -1).float()  # [..., heads_here * hn]
        square_sum = flat.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            square_sum = _SumOverTP.apply(square_sum, self.group)
        y = flat * torch.rsqrt(square_sum / self.width + self.eps)
        return (y * self.weight.float()).to(x.dtype).view_as(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint the weight as split over TP (not replicated, the default for norms)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        dp_cp = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True
        )
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0}, sharded_offsets, tp_group=self.group, dp_cp_group=dp_cp
        )


@dataclasses.dataclass
class PostNormSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


class PostNormLayer(TransformerLayer):
    """A TransformerLayer that normalises each sublayer's output before the residual add.

    x + post_self_attn_layernorm(attention(input_layernorm(x))), then the same for
    the MLP. OLMo 2 has only these norms (its input_layernorm and pre_mlp_layernorm
    are identities); Gemma 2 has both.
    """

    def __init__(self, config, submodules: PostNormSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)

        def norm(spec):
            return build_module(
                spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )

        self.post_self_attn_layernorm = norm(submodules.post_self_attn_layernorm)
        self.post_mlp_layernorm = norm(submodules.post_mlp_layernorm)
        # Megatron-Core adds the residual inside its bias-dropout-add functions; the
        # norm goes in front of them (bound methods, so that deepcopy stays right).
        self._attn_add, self._mlp_add = self.self_attn_bda, self.mlp_bda
        self.self_attn_bda, self.mlp_bda = self._normed_attn_add, self._normed_mlp_add

    def _normed_attn_add(self, training, fused):
        return _norm_then(self._attn_add(training, fused), self.post_self_attn_layernorm)

    def _normed_mlp_add(self, training, fused):
        return _norm_then(self._mlp_add(training, fused), self.post_mlp_layernorm)


def _norm_then(add, norm):
    def apply(output_and_bias, residual, prob):
        out, bias = output_and_bias
        if bias is not None:  # the sublayer's own bias comes before the norm
            out = out + bias
        return add((norm(out), None), residual, prob)

    return apply


def norm_class(cfg):
    return RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm


def block_spec(cfg, tconfig):
    """The local spec with SDPA attention and megabridge's norms swapped in.

    A whole-block spec, so that the final norm is megabridge's too.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    spec = get_gpt_layer_local_spec(
        num_experts=cfg.num_moe_experts,
        qk_layernorm=cfg.qk_layernorm,
        normalization=cfg.normalization,
    )
    norm = norm_class(cfg)
    sub = spec.submodules
    sub.input_layernorm = norm
    if not cfg.num_moe_experts or sub.pre_mlp_layernorm is not None:
        sub.pre_mlp_layernorm = norm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if cfg.qk_layernorm:
        attn.q_layernorm = norm
        attn.k_layernorm = norm
    if cfg.qk_norm_across_heads:
        attn.q_layernorm = ModuleSpec(module=AcrossHeadsRMSNorm, params={"heads": "query"})
        attn.k_layernorm = ModuleSpec(module=AcrossHeadsRMSNorm, params={"heads": "key"})
    if cfg.norm_placement != "pre":
        spec = _post_norm_spec(cfg, sub, norm)
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(tconfig), layer_norm=norm
    )


def _post_norm_spec(cfg, sub, norm):
    if cfg.num_moe_experts:
        raise ConfigError(f"norm_placement={cfg.norm_placement} is not supported with MoE yet")
    fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
    pre = norm if cfg.norm_placement == "pre_post" else IdentityOp
    fields.update(input_layernorm=pre, pre_mlp_layernorm=pre)
    return ModuleSpec(
        module=PostNormLayer,
        submodules=PostNormSubmodules(
            **fields, post_self_attn_layernorm=norm, post_mlp_layernorm=norm
        ),
    )
