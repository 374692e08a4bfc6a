"""megabridge's torch-native layer spec: fast without Transformer Engine.

Megatron-Core's local spec materialises the [b, heads, s, s] score matrix and
its mask; this spec uses torch's scaled_dot_product_attention (flash /
memory-efficient kernels on GPU) with ``is_causal`` and native GQA, and runs
packed (THD) sequences segment by segment, so no s x s mask ever exists.
Parameter names are those of the local spec, so conversion mappings and
checkpoints are shared. It also has what neither other spec has, chosen per
layer: norms after attention and MLP, sliding-window attention, soft-capped
attention scores and a per-layer RoPE theta (Gemma 2/3); chunked attention, a weightless
QK norm and the NoPE layers' query temperature (Llama 4: models/attention_ops.py).
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config as yarn_scale,
)
from megatron.core.transformer import attention as megatron_attention
from megatron.core.transformer.attention import SelfAttention as MegatronSelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer as MegatronLayer
from megatron.core.utils import divide
from torch.utils.checkpoint import checkpoint

from megabridge.errors import ConfigError
from megabridge.models import (
    compiled,
    fp8,
    norm_recompute,
    rope,
    swiglu_recompute,
    triton_kernels,
)
from megabridge.models.attention_ops import (
    attend_in_blocks,
    attend_in_segments,
    block_allowed,
    l2_norm,
    packed_positions,
    segment_groups,
    split_segments,
    temperature_scales,
)
from megabridge.models.config import layer_in_bf16, recompute_granularity

# Queries per block in chunked_attention (module-level so that tests can shrink it).
ATTENTION_CHUNK = 512


class SDPAttention(MegatronModule):
    """Core attention (softmax(QK^T) V) through F.scaled_dot_product_attention.

    Same constructor and call signature as megatron-core's DotProductAttention, plus
    this layer's ``sliding_window`` and score ``softcap`` (set by block_spec), which
    SDPA has no argument for: such layers go through chunked_attention.
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
        sliding_window: int | None = None,
        softcap: float | None = None,
        rotary_scaling: tuple[int, float] | None = None,
        sinks: bool = False,
        chunk_size: int | None = None,
        qk_l2_norm_eps: float | None = None,
        temperature: tuple[int, float] | None = None,
    ):
        super().__init__(config=config)
        from megatron.core.transformer.enums import AttnMaskType

        # no_mask: bidirectional attention (a vision tower's layers, models/vision_encoder.py),
        # within the segments that packed_seq_params' cu_seqlens_q cuts the sequence into
        self.causal = attn_mask_type != AttnMaskType.no_mask
        if config.context_parallel_size != 1:
            raise ConfigError("context parallelism is not supported yet by the torch layer spec")
        if config.window_size is not None:
            raise ConfigError(
                "TransformerConfig.window_size is not read by the torch spec; "
                "set model.sliding_window instead"
            )
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(hn), SDPA's default
        self.sliding_window = sliding_window
        self.softcap = softcap
        # (rotated dims, factor): queries and keys come here after RoPE, so the factor that
        # transformers puts on cos and sin (both q and k) is factor**2 on the rotated
        # dims of q alone. Applied before any attention path (SDPA, chunked, varlen).
        self.rotary_scaling = rotary_scaling
        # Attention sinks (GPT-OSS): one learned logit per query head, split over TP ranks
        # with the heads; named as Megatron's DotProductAttention names it.
        self.softmax_offset = None
        if sinks:
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

            self.softmax_offset = torch.nn.Parameter(
                torch.zeros(self.heads, dtype=config.params_dtype)
            )
            set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)
        # Llama 4: attention within blocks of chunk_size tokens; a weightless RMS norm of each
        # query and key head after RoPE; (floor, scale) of the queries' temperature tuning.
        self.chunk_size = chunk_size
        self.qk_l2_norm_eps = qk_l2_norm_eps
        self.temperature = temperature

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks=None):
        # q [b, np, s, hn], k/v [b, ng, s, hn] -> [b, np, s, hn]
        if self.chunk_size is not None and q.shape[2] > self.chunk_size:
            if blocks is not None:
                raise ConfigError(
                    "bidirectional image attention with chunked attention is not supported yet"
                )
            return attend_in_blocks(self._attend_whole, q, k, v, self.chunk_size)
        return self._attend_whole(q, k, v, blocks)

    def _attend_whole(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks=None):
        plain = self.sliding_window is None and self.softcap is None and self.softmax_offset is None
        if plain and blocks is None:
            return sdpa(q, k, v, self._p(), self.softmax_scale)
        scale = q.shape[-1] ** -0.5 if self.softmax_scale is None else self.softmax_scale
        return chunked_attention(
            q, k, v, scale, self.sliding_window, self.softcap, self._p(), self.softmax_offset,
            blocks=blocks,
        )  # fmt: skip

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
        if self.rotary_scaling is not None:
            query = scale_rotated_dims(query, *self.rotary_scaling)
        query, key, value = (_own_storage(t) for t in (query, key, value))
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if self.qk_l2_norm_eps is not None:
            query, key = l2_norm(query, self.qk_l2_norm_eps), l2_norm(key, self.qk_l2_norm_eps)
        if self.temperature is not None:
            query = self._temperature_tuned(query, packed_seq_params if packed else None)
        # An integer attention_mask [b, s] holds image block ids (attention_ops.image_blocks):
        # each image's tokens see each other both ways (VisionLanguageModel passes it).
        blocks = attention_mask if _is_block_ids(attention_mask) else None
        if not self.causal:
            return self._forward_bidirectional(query, key, value, packed_seq_params)
        if packed:
            if blocks is not None:
                raise ConfigError(
                    "bidirectional image attention on packed sequences is not supported yet"
                )
            return self._forward_packed(query, key, value, packed_seq_params)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._attend(q, k, v, blocks)  # [b, np, sq, hn]
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _forward_bidirectional(self, query, key, value, params):
        """Each token sees every token of its segment (params.cu_seqlens_q over s; the whole
        sequence without params), b = 1: [s, 1, n, hn] -> [s, 1, np * hn]. Megatron-Core
        applied RoPE already (qkv_format "sbhd": per-token angles, not per-segment positions)."""
        plain = self.sliding_window is None and self.softcap is None and self.softmax_offset is None
        if not plain or self.chunk_size is not None or query.shape[1] != 1:
            raise ConfigError("bidirectional attention takes one plain sequence of segments")
        s = query.shape[0]
        # vision_encoder.segments groups the segments once per tower forward
        groups = getattr(params, "groups", None)
        if groups is None:
            bounds = [0, s] if params is None else params.cu_seqlens_q.tolist()
            groups = segment_groups(bounds, query.device)
        q, k, v = (t[:, 0] for t in (query, key, value))  # [s, n, hn]

        def attend(qs, ks, vs):  # [segments, len, n, hn] -> the same
            qs, ks, vs = (t.transpose(1, 2) for t in (qs, ks, vs))
            return sdpa(qs, ks, vs, self._p(), self.softmax_scale, causal=False).transpose(1, 2)

        return attend_in_segments(attend, q, k, v, groups).reshape(s, 1, -1)

    def _temperature_tuned(self, query: torch.Tensor, packed_params) -> torch.Tensor:
        """query [s, b, np, hn] (or packed [t, np, hn]) times its position's temperature;
        packed positions restart at 0 in each segment, as RoPE's do."""
        t = query.shape[0]
        if packed_params is None:
            positions = torch.arange(t, device=query.device)
        else:
            positions = packed_positions(packed_params.cu_seqlens_q, t).to(query.device)
        scales = temperature_scales(positions, *self.temperature)  # [s] fp32
        scales = scales.view(t, *([1] * (query.dim() - 1)))
        return (query * scales).to(query.dtype)

    def _forward_packed(self, query, key, value, params):
        # THD: [t, n, hn]; each segment attends causally to itself only.
        t = query.shape[0]
        if self.chunk_size is not None:  # each chunk of a segment is a segment of its own
            params = split_segments(params, self.chunk_size)
        if self._varlen_ok(query):
            return varlen_causal(query, key, value, params, self.softmax_scale).reshape(t, -1)
        bounds = params.cu_seqlens_q.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end <= start:
                continue
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            outs.append(self._attend(q, k, v)[0].transpose(0, 1))  # [len, np, hn]
        out = torch.cat(outs, dim=0) if outs else query.new_zeros(0, self.heads, query.shape[-1])
        if out.shape[0] < t:  # padding after the last segment
            out = torch.cat([out, out.new_zeros(t - out.shape[0], *out.shape[1:])])
        return out.reshape(t, -1)

    def _varlen_ok(self, query) -> bool:
        """Whether torch's varlen flash kernel computes this layer's packed attention."""
        plain = self.sliding_window is None and self.softcap is None and self._p() == 0.0
        plain = plain and self.softmax_offset is None  # no sinks in the flash kernel
        return plain and varlen_supported(query, self.softmax_scale)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The sinks are split over TP with the heads (as in DotProductAttention)."""
        if self.softmax_offset is None:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"softmax_offset": 0}, sharded_offsets
        )


def _own_storage(value: torch.Tensor) -> torch.Tensor:
    """``value`` in its own storage when it is a slice of a bigger one, while training.

    Megatron-Core splits Q, K and V off the fused QKV output as views; attention keeps them
    for backward, and a view keeps its whole storage: (np + 2 ng) * hn values per token where
    ng * hn are needed for V (3072 for 512 at the 1.1B Llama shape, where Q and K are new
    tensors after RoPE; without RoPE, or with as many groups as heads, Q and K are views too).
    The copy costs one pass over V.
    """
    # A slice along the last dimension is never contiguous; a tensor that is (a new one, or
    # RoPE's output) is returned as it is. (is_contiguous, not the storage's size: no graph
    # break under model.compile_layers.)
    if torch.is_grad_enabled() and value.requires_grad:
        return value.contiguous()
    return value


def _is_block_ids(mask) -> bool:
    return (
        isinstance(mask, torch.Tensor)
        and mask.dim() == 2
        and not mask.is_floating_point()
        and mask.dtype != torch.bool
    )


def scale_rotated_dims(query: torch.Tensor, dims: int, factor: float) -> torch.Tensor:
    """query [..., hn] with its first ``dims`` (rotated) channels times factor**2."""
    rotated, rest = query[..., :dims], query[..., dims:]
    return torch.cat([rotated * factor**2, rest], dim=-1)


@functools.cache
def _varlen_api() -> tuple | None:
    """(torch's varlen_attn, its keyword names), or None where this torch has none.

    torch.nn.attention.varlen (torch 2.9+) changed between releases: causal masking
    is ``is_causal=True`` in some and ``window_size=(-1, 0)`` in others; ``scale``
    and ``enable_gqa`` exist only in some (torch 2.11 has window_size and scale, no
    enable_gqa). A flash kernel: CUDA, fp16 / bf16 only.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    keywords = frozenset(inspect.signature(varlen_attn).parameters)
    return (varlen_attn, keywords) if keywords & {"is_causal", "window_size"} else None


def varlen_supported(query: torch.Tensor, scale: float | None) -> bool:
    api = _varlen_api()
    if api is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    # Without a scale argument only the default 1/sqrt(hn) is available.
    return "scale" in api[1] or scale is None or scale == query.shape[-1] ** -0.5


def varlen_causal(query, key, value, params, scale: float | None) -> torch.Tensor:
    """Causal attention inside each packed segment, one flash kernel for all of them.

    query [t, np, hn], key/value [t, ng, hn] -> [t, np, hn]. The segments are
    params.cu_seqlens_q (int32, on the device).
    """
    varlen_attn, keywords = _varlen_api()
    cu = params.cu_seqlens_q.to(device=query.device, dtype=torch.int32)
    longest = int(params.max_seqlen_q) if params.max_seqlen_q else int((cu[1:] - cu[:-1]).max())
    kwargs = {"window_size": (-1, 0)} if "window_size" in keywords else {"is_causal": True}
    if "scale" in keywords:
        kwargs["scale"] = scale
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in keywords:
            kwargs["enable_gqa"] = True
        else:  # [t, ng, hn] -> [t, np, hn]: each K/V head once per query head of its group
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return varlen_attn(query, key, value, cu, cu, longest, longest, **kwargs)


def sdpa(q, k, v, dropout_p: float, scale: float | None, mask=None, causal=True) -> torch.Tensor:
    """q [b, np, sq, hn], k/v [b, ng, sk, hn] -> [b, np, sq, hn].

    Causal when ``mask`` is None (unless not ``causal``), else ``mask`` [sq, sk] (True: may
    attend).
    """
    is_causal = causal and mask is None
    kwargs = dict(dropout_p=dropout_p, scale=scale, is_causal=is_causal, attn_mask=mask)
    if k.shape[1] != q.shape[1]:
        if q.device.type == "cpu" or mask is not None:
            # enable_gqa is not taken by every CPU kernel, nor by the GPU kernels that take
            # a mask (memory-efficient); repeat instead.
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        else:
            kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def chunked_attention(
    q, k, v, scale: float, window: int | None, softcap: float | None, dropout_p: float, sinks=None,
    blocks=None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention with an optional sliding window, score soft-cap and attention sinks
    (``sinks`` [np]: a logit per head in every softmax, dropped after it), no s x s tensor.
    ``blocks`` [b, s]: image block ids (attention_ops.image_blocks); an image's tokens also
    see its later tokens (within the window), as transformers' Gemma 3 masks.

    q [b, np, s, hn], k/v [b, ng, s, hn] -> [b, np, s, hn]. Queries go in chunks of
    ATTENTION_CHUNK, each against only the keys it may see: score blocks are at most
    [b, np, chunk, chunk + window - 1] ([b, np, chunk, s] without a window). Window
    semantics are transformers': query i sees keys j with i - window < j <= i.
    """
    s, chunk = q.shape[2], ATTENTION_CHUNK
    outs = []
    for start in range(0, s, chunk):
        end = min(start + chunk, s)
        first = 0 if window is None else max(0, start - window + 1)
        last = end if blocks is None else s  # an image token may see later ones
        q_pos = torch.arange(start, end, device=q.device)[:, None]
        k_pos = torch.arange(first, last, device=q.device)[None, :]
        # [c, kc], or [b, 1, c, kc] with image blocks
        allowed = k_pos <= q_pos if blocks is None else block_allowed(blocks, q_pos, k_pos)
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        qc, kc, vc = q[:, :, start:end], k[:, :, first:last], v[:, :, first:last]
        if softcap is None and sinks is None:
            outs.append(sdpa(qc, kc, vc, dropout_p, scale, mask=allowed))
        elif torch.is_grad_enabled() and (q.requires_grad or sinks is not None):
            # Recompute the scores in backward instead of keeping every chunk's.
            args = (qc, kc, vc, allowed, scale, softcap, dropout_p, sinks)
            outs.append(checkpoint(_capped, *args, use_reentrant=False))
        else:
            outs.append(_capped(qc, kc, vc, allowed, scale, softcap, dropout_p, sinks))
    return torch.cat(outs, dim=2)


def _capped(
    q, k, v, allowed, scale: float, softcap: float | None, dropout_p: float, sinks=None
) -> torch.Tensor:
    """Attention on explicit scores in transformers' eager order: scale, cap, mask, then an
    fp32 softmax, over the scores and (with ``sinks`` [np]) a sink column dropped after it.

    q [b, np, c, hn], k/v [b, ng, kc, hn], allowed [c, kc] -> [b, np, c, hn].
    """
    b, heads, c, d = q.shape
    groups = k.shape[1]
    q = q.reshape(b, groups, heads // groups, c, d)  # query heads grouped by their K/V head
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # [b, ng, 1, kc, hn]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [b, ng, np/ng, c, kc]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed.dim() == 4:  # [b, 1, c, kc] -> [b, 1, 1, c, kc] (image blocks)
        allowed = allowed.unsqueeze(1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # [np] -> [b, ng, np/ng, c, 1], one more "key" per row
        column = sinks.to(scores.dtype).reshape(1, groups, heads // groups, 1, 1)
        scores = torch.cat([scores, column.expand(*scores.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v).reshape(b, heads, c, d)


class RMSNorm(torch.nn.Module):
    """RMSNorm with an optional zero-centred weight (Gemma applies 1 + w).

    Normalises in float32 and casts back, as transformers does: Llama-style norms
    cast before multiplying by w; zero-centred (Gemma) ones multiply by (1 + w) in
    float32 and cast after.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel
        self._computed = None  # (input, output) from the residual add that made the input

    def computed(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y is this norm of x, computed with the add that made x (models/residual_norm.py):
        the next call with x itself returns it."""
        self._computed = (x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        computed, self._computed = self._computed, None
        if computed is not None and computed[0] is x:
            return computed[1]
        if self.zero_centered:
            y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        # One kernel forward and one backward, in fp32 (or aten's rms_norm where the kernels do
        # not run: compiled graphs, other dtypes). runs_on: Triton's interpreter in tests.
        if x.is_cuda or triton_kernels.runs_on(x):
            return triton_kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # exactly transformers' order of operations
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return y * self.weight


class LatentRMSNorm(RMSNorm):
    """Multi-latent attention's q/kv latent norms with an epsilon of their own.

    Megatron-Core gives them the layers' epsilon; transformers' DeepSeek models always
    use 1e-6 there, whatever rms_norm_eps says (Moonlight: 1e-5).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, latent_eps=None, **_):
        super().__init__(config, hidden_size, eps=eps if latent_eps is None else latent_eps)


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        if config.layernorm_zero_centered_gamma:
            raise ConfigError("zero-centred LayerNorm is not supported yet")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


_compiled_rope = None


def fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE as one kernel forward and one backward (Megatron's fused-RoPE signature).

    t [s, b, n, d], freqs [s, 1, 1, rot]. On the GPU megabridge's Triton kernel
    (triton_kernels.rope), or a compiled one for layouts it does not take; on the CPU
    (tests that route through this path) the same function runs eagerly.
    """
    global _compiled_rope
    if interleaved:
        raise ConfigError("interleaved RoPE is not supported by the torch layer spec")
    if not t.is_cuda or triton_kernels.rope_fits(t, freqs):
        return triton_kernels.rope(t, freqs)
    if _compiled_rope is None:
        # Automatic dynamic shapes: a second shape (keys have fewer heads than queries, another
        # micro-batch or sequence length) compiles one kernel with symbolic sizes instead of one
        # per shape, which would run into dynamo's recompile limit and fall back to eager.
        _compiled_rope = torch.compile(triton_kernels.rope_torch, dynamic=None)
    return _compiled_rope(t, freqs)


def packed_freqs(cu_seqlens: torch.Tensor, freqs: torch.Tensor, total: int) -> torch.Tensor:
    """The RoPE angles of every packed token: positions restart at 0 in each segment.

    cu_seqlens [segments + 1], freqs [max_len, 1, 1, rot] -> [total, 1, 1, rot].
    """
    return freqs[packed_positions(cu_seqlens.to(freqs.device), total)]


def rope_thd(t, cu_seqlens, freqs, cp_size: int = 1, cp_rank: int = 0):
    """Packed (THD) RoPE, the fused kernel over all segments at once: t [t, n, d] -> [t, n, d].

    Megatron-Core 0.16's dispatcher (rope_utils.apply_rotary_pos_emb) hands a fused THD
    kernel only cp_size and cp_rank, while its own _apply_rotary_pos_emb_thd requires
    the context-parallel group itself ("cp_group must be provided"): calling it from
    here failed every packed step on the GPU. The torch spec has no context parallelism.
    """
    if cp_size != 1:
        raise ConfigError("context parallelism is not supported yet by the torch layer spec")
    return fused_rope(t.unsqueeze(1), packed_freqs(cu_seqlens, freqs, t.shape[0])).squeeze(1)


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
    # Megatron's slot for TE's fused Q/K/V split with RoPE (config.fused_single_qkv_rope),
    # which SelfAttention below switches on where it applies
    if not megatron_attention.HAVE_FUSED_QKV_ROPE:
        megatron_attention.apply_fused_qkv_rotary_pos_emb = triton_kernels.qkv_rope
        megatron_attention.HAVE_FUSED_QKV_ROPE = True


class SelfAttention(MegatronSelfAttention):
    """Megatron-Core's self-attention; on the GPU the split of the fused QKV projection and
    RoPE are one step (triton_kernels.qkv_rope, through Megatron's fused_single_qkv_rope slot).

    Megatron reshapes the query out of the fused row first (a copy of a strided view), rotates
    q and k, and in backward concatenates dq, dk and dv into the row's gradient; the fused
    step reads and writes the row directly. Megatron asserts that fused_single_qkv_rope is
    only set where its fused path applies, so the flag is set per call, for calls it takes:
    plain RoPE on [s, b] sequences (not packed, no inference cache), no Q/K norms or output
    gate, no YaRN attention scale, the query groups not split across tensor-parallel ranks.
    """

    def forward(self, hidden_states, *args, **kwargs):
        config = self.config
        before = config.fused_single_qkv_rope
        config.fused_single_qkv_rope = self._fuses_qkv_rope(hidden_states, args, kwargs)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            config.fused_single_qkv_rope = before

    def _fuses_qkv_rope(self, hidden_states, args, kwargs) -> bool:
        config = self.config
        plain = lambda norm: norm is None or isinstance(norm, IdentityOp)  # noqa: E731
        return (
            hidden_states.is_cuda
            and getattr(megatron_attention, "apply_fused_qkv_rotary_pos_emb", None)
            is triton_kernels.qkv_rope
            and not torch.compiler.is_compiling()
            and len(args) <= 1  # (attention_mask); the rest comes by keyword
            and torch.is_tensor(kwargs.get("rotary_pos_emb"))
            and kwargs.get("packed_seq_params") is None
            and kwargs.get("inference_context") is None
            and kwargs.get("key_value_states") is None
            and plain(self.q_layernorm)
            and plain(self.k_layernorm)
            and not config.attention_output_gate
            and not config.flash_decode
            and not config.test_mode
            and config.apply_rope_fusion
            and not config.rotary_interleaved
            and config.num_query_groups >= self.world_size
            and yarn_scale(config) == 1.0
        )


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


def _expert_output_linear():
    """RowParallelLinear for experts with biases, whose output may be added to in place.

    Megatron-Core's MLP adds an expert's probability-scaled bias in place
    (mlp.py: ``output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)``), on
    what the row-parallel reduce returned; at expert TP 1 (the only layout Megatron-Core
    allows with expert biases) that is its input returned as is, which autograd forbids
    modifying in place ("Output 0 of _ReduceFromModelParallelRegion is a view"). A copy
    while training makes it an ordinary tensor; inference keeps the output as it is.
    """
    from megatron.core.tensor_parallel import RowParallelLinear

    class ExpertRowParallelLinear(RowParallelLinear):
        def forward(self, *args, **kwargs):
            output, bias = super().forward(*args, **kwargs)
            if bias is not None and torch.is_grad_enabled():
                output = output.clone()
            return output, bias

    return ExpertRowParallelLinear


def norm_class(cfg):
    return RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm


class TransformerLayer(MegatronLayer):
    """Megatron-Core's transformer layer with two per-layer options of the torch spec.

    * ``post_norm`` (a norm class): the attention and MLP outputs are normed before
      each residual add, x + norm(attn(input_norm(x))) (Gemma 2/3), by the parameters
      ``post_self_attn_layernorm`` and ``post_mlp_layernorm``;
    * ``rotary_base``: this layer's own RoPE theta in place of the model's, unscaled
      (Gemma 3's sliding-window layers);
    * ``residual_multiplier``: the attention and MLP outputs (after any post norm) are
      multiplied by it before each residual add, x + m * attn(norm(x)) (Granite);
    * ``recompute_norms``: the norms before attention and MLP do not keep their outputs
      for backward (models/norm_recompute.py).
    """

    def __init__(
        self, config, submodules, *args, post_norm=None, rotary_base=None,
        residual_multiplier=None, recompute_norms=False, **kwargs,
    ):  # fmt: skip
        super().__init__(config, submodules, *args, **kwargs)
        # Plain x + sublayer(norm(x)) adds, which models/residual_norm.py may fuse with the norm
        # after them.
        self.plain_residuals = not (recompute_norms or residual_multiplier or post_norm)
        if recompute_norms:
            norm_recompute.recompute_norm_outputs(self)
        if residual_multiplier is not None:  # innermost: a post norm goes in front of it
            for name in ("self_attn_bda", "mlp_bda"):
                bda = functools.partial(_scale_then_add, getattr(self, name), residual_multiplier)
                setattr(self, name, bda)
        if post_norm is not None:
            for name in ("post_self_attn_layernorm", "post_mlp_layernorm"):
                norm = post_norm(config, config.hidden_size, eps=config.layernorm_epsilon)
                setattr(self, name, norm)
            # Megatron's layer calls self.<x>_bda(training, fused)(output_with_bias,
            # residual, dropout); the norm goes in front of that add.
            self.self_attn_bda = functools.partial(
                self._norm_then_add, self.self_attn_bda, "post_self_attn_layernorm"
            )
            self.mlp_bda = functools.partial(
                self._norm_then_add, self.mlp_bda, "post_mlp_layernorm"
            )
        self.rotary_base = rotary_base

    def _norm_then_add(self, bda, norm_name: str, training: bool, fused: bool):
        add = bda(training, fused)
        norm = getattr(self, norm_name)

        def norm_then_add(output_with_bias, residual, prob):
            output, bias = output_with_bias  # [s, b, h]
            if bias is not None:
                output = output + bias
            return add((norm(output), None), residual, prob)

        return norm_then_add

    def forward(self, *args, **kwargs):
        if self.rotary_base is not None and kwargs.get("rotary_pos_emb") is not None:
            if kwargs.get("rotary_pos_cos") is not None:
                raise ConfigError("a per-layer RoPE theta does not support fused-RoPE inference")
            kwargs["rotary_pos_emb"] = self._own_rotary(kwargs["rotary_pos_emb"])
        return super().forward(*args, **kwargs)

    def _own_rotary(self, model_emb: torch.Tensor) -> torch.Tensor:
        """The model's RoPE angles [s, 1, 1, dim] recomputed with this layer's theta."""
        inv = rope.inv_freq(model_emb.shape[-1], self.rotary_base, {}).to(model_emb.device)
        positions = torch.arange(model_emb.shape[0], device=inv.device, dtype=inv.dtype)
        freqs = torch.outer(positions, inv)  # [s, dim / 2]
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def _scale_then_add(bda, multiplier: float, training: bool, fused: bool):
    add = bda(training, fused)

    def scale_then_add(output_with_bias, residual, prob):
        output, bias = output_with_bias  # [s, b, h]
        if bias is not None:
            output = output + bias
        return add((output * multiplier, None), residual, prob)

    return scale_then_add


def block_spec(cfg, tconfig):
    """Megatron-Core's local block spec with megabridge's layer, SDPA attention and norms.

    A whole-block spec, so that the final norm is megabridge's too. One spec per
    layer: dense or MoE as ``moe_layer_freq`` says (megatron-core reads it from
    tconfig), and each with its own attention variant (sliding window or not) from
    its global index.
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
    layers = [
        _layer_spec(layer_specs[offset + i], cfg, offset + i)
        for i in range(get_num_layers_to_build(tconfig))
    ]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm)


def plain_swiglu(cfg) -> bool:
    """SwiGLU without GPT-OSS's alpha, offset or clamp (what the fused SwiGLUs compute)."""
    return (
        cfg.activation == "swiglu"
        and cfg.swiglu_alpha is None
        and not cfg.glu_linear_offset
        and cfg.activation_clamp is None
    )


def triton_swiglu(cfg) -> bool:
    """Whether the dense MLPs take triton_kernels.SwiGLU as their activation module (when
    Triton is here). Not with experts: Megatron's config switch for activation modules
    (use_te_activation_func) reaches every MLP of the model, and its expert MLPs have no
    such module, so they would apply a plain silu to [gate | up]."""
    return plain_swiglu(cfg) and not cfg.num_moe_experts and triton_kernels.triton is not None


def _use_megabridge_modules(spec, cfg, norm) -> None:
    spec.module = TransformerLayer
    sub = spec.submodules
    if triton_swiglu(cfg):  # used only where provider sets use_te_activation_func (on GPU)
        sub.mlp.submodules.activation_func = ModuleSpec(module=triton_kernels.SwiGLU)
    sub.input_layernorm = norm
    sub.pre_mlp_layernorm = norm
    if cfg.norm_placement == "post":  # OLMo 2: norms after the sublayers only
        sub.input_layernorm = sub.pre_mlp_layernorm = IdentityOp
    experts = getattr(sub.mlp.submodules, "experts", None)
    if experts is not None and cfg.add_bias_linear:
        experts.submodules.linear_fc2 = _expert_output_linear()
    if sub.self_attention.module is MegatronSelfAttention:
        sub.self_attention.module = SelfAttention
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if cfg.qk_layernorm:  # multi-latent attention has q_layernorm and kv_layernorm
        for field in ("q_layernorm", "k_layernorm", "kv_layernorm"):
            if hasattr(attn, field):
                setattr(attn, field, norm)
    if cfg.latent_norm_epsilon is not None:
        latent = ModuleSpec(module=LatentRMSNorm, params={"latent_eps": cfg.latent_norm_epsilon})
        attn.q_layernorm = attn.kv_layernorm = latent
    if cfg.qk_norm_across_heads:  # OLMo 2: one norm over all heads of the projection
        attn.q_layernorm = ModuleSpec(module=AcrossHeadsRMSNorm, params={"heads": "query"})
        attn.k_layernorm = ModuleSpec(module=AcrossHeadsRMSNorm, params={"heads": "key"})
    if cfg.fp8 is not None:
        _use_fp8_linears(sub, cfg)
    if cfg.recompute_swiglu is not False:
        _use_recomputed_swiglu(sub, cfg)
    _use_own_row_linears(sub)


def _use_own_row_linears(sub) -> None:
    """Megatron's plain row-parallel linears as compiled.RowParallelLinear (the same layer,
    without the per-call group lookup that splits a compiled layer's graph)."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    mlp = getattr(sub.mlp, "submodules", None)
    shared = getattr(mlp, "shared_experts", None)
    owners = (sub.self_attention.submodules, mlp, getattr(shared, "submodules", None))
    for owner in owners:
        for field in ("linear_proj", "linear_fc2"):
            if getattr(owner, field, None) is RowParallelLinear:
                setattr(owner, field, compiled.RowParallelLinear)


def _use_recomputed_swiglu(sub, cfg) -> None:
    """A dense SwiGLU MLP that keeps fc1's output only (models/swiglu_recompute.py): where
    model.recompute_swiglu asks for it (true), or wherever it applies (None)."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer.mlp import MLP

    required = cfg.recompute_swiglu is True
    if cfg.compile_layers:
        if not required:
            return
        raise ConfigError("model.recompute_swiglu with model.compile_layers is not supported yet")
    if cfg.fp8 is not None and not required:  # with FP8 where asked only, until measured
        return
    if not plain_swiglu(cfg):  # GPT-OSS's SwiGLU is not the recomputed one
        if not required:
            return
        raise ConfigError("model.recompute_swiglu needs a plain SwiGLU MLP (activation=swiglu)")
    if sub.mlp.module is not MLP:
        return
    fc2 = sub.mlp.submodules.linear_fc2
    swiglu_recompute.quiet_unknown_mlp_warning()
    if fc2 is RowParallelLinear:
        sub.mlp.module = swiglu_recompute.RecomputedSwiGLUMLP
        sub.mlp.submodules.linear_fc2 = swiglu_recompute.SwiGLURowParallelLinear
    elif isinstance(fc2, ModuleSpec) and fc2.module is fp8.FP8RowParallelLinear:
        sub.mlp.module = swiglu_recompute.RecomputedSwiGLUMLP
        sub.mlp.submodules.linear_fc2 = ModuleSpec(
            module=swiglu_recompute.FP8SwiGLURowParallelLinear, params=fc2.params
        )


def _use_fp8_linears(sub, cfg) -> None:
    """The layer's plain linears (attention QKV and output, a dense MLP's two) in FP8.

    An MoE layer's experts stay in bf16 (grouped GEMMs have no FP8 path here yet), and so do
    the layers model.first_last_layers_bf16 names (_layer_spec). Whether this machine can run
    them is checked where the model is materialised (provider).
    """

    for owner, field, module in _block_linears(sub):
        if module in fp8.FP8_CLASS_OF:
            spec = ModuleSpec(module=fp8.FP8_CLASS_OF[module], params={"fp8_recipe": cfg.fp8})
            setattr(owner, field, spec)


def _use_bf16_linears(sub) -> None:
    """The layer's FP8 linears back in bf16 (model.first_last_layers_bf16)."""
    for owner, field, module in _block_linears(sub):
        if isinstance(module, ModuleSpec) and hasattr(module.module, "bf16_class"):
            setattr(owner, field, module.module.bf16_class)


def _block_linears(sub):
    """(owner, field, spec) of the layer's attention and dense-MLP linears."""
    mlp = getattr(sub.mlp, "submodules", None)
    for owner in (sub.self_attention.submodules, mlp):
        for field in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
            if hasattr(owner, field):
                yield owner, field, getattr(owner, field)


def _layer_spec(spec, cfg, layer: int):
    """``spec`` with the options of 0-based global ``layer``."""
    window = cfg.window_of_layer(layer)
    spec = copy.deepcopy(spec)
    if cfg.fp8 is not None and layer_in_bf16(cfg, layer):
        _use_bf16_linears(spec.submodules)
    spec.params = dict(
        post_norm=norm_class(cfg) if cfg.norm_placement != "pre" else None,
        rotary_base=cfg.local_rotary_base if window is not None else None,
        residual_multiplier=cfg.residual_multiplier,
        recompute_norms=recomputes_norms(cfg),
    )
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SDPAttention,
        params={
            "sliding_window": window,
            "softcap": cfg.attn_logit_softcap,
            "rotary_scaling": _rotary_scaling(cfg),
            "sinks": cfg.attention_sinks,
            **_llama4_attention(cfg, layer),
        },
    )
    return spec


def recomputes_norms(cfg) -> bool:
    """Whether the torch spec recomputes the pre-sublayer norms (models/norm_recompute.py)."""
    return recompute_granularity(cfg) == "selective" and "layernorm" in (
        cfg.recompute_modules or ()
    )


def _llama4_attention(cfg, layer: int) -> dict:
    """SDPAttention's chunk_size, qk_l2_norm_eps and temperature for 0-based ``layer``."""
    nope = layer in (cfg.no_rope_layers or [])
    tuned = cfg.attn_temperature_scale is not None and nope
    return dict(
        chunk_size=cfg.chunk_of_layer(layer),
        qk_l2_norm_eps=cfg.layernorm_epsilon if layer in (cfg.qk_l2_norm_layers or []) else None,
        temperature=(cfg.attn_temperature_floor, cfg.attn_temperature_scale) if tuned else None,
    )


def _rotary_scaling(cfg) -> tuple[int, float] | None:
    """(rotated channels per head, factor) of cfg.rotary_attention_scaling, as Megatron-Core's
    RotaryEmbedding sizes its rotation; None when there is nothing to scale."""
    if cfg.rotary_attention_scaling in (None, 1.0) or cfg.position_embedding_type != "rope":
        return None
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return int(head_dim * cfg.rotary_percent), float(cfg.rotary_attention_scaling)
