"""Model FLOPs per token, counted the way Megatron-LM's num_floating_point_operations does.

Counted: every GEMM three times (forward, weight gradient, data gradient) at 2
FLOPs per multiply-add; attention as causal (half of the score matrix); the
gated MLP's third projection; the output (logits) layer. Not counted:
recomputation, norms, softmax and other element-wise work.
"""

from __future__ import annotations

H100_BF16_PEAK_TFLOPS = 989.0

# Dense bf16 peaks (TFLOP/s, no sparsity) by a fragment of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H100": H100_BF16_PEAK_TFLOPS, "H200": 989.0, "H20": 148.0, "A100": 312.0}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak, or None when we do not know this GPU (then no MFU is logged)."""
    for fragment, peak in BF16_PEAK_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None


def flops_per_token(cfg, seq_length: int, vocab_size: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of ``cfg`` (a ModelConfig)."""
    h, layers = cfg.hidden_size, cfg.num_layers
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or h // heads
    query_ratio = head_dim * heads / h
    gated = 1.5 if cfg.activation in ("swiglu", "geglu") else 1.0
    experts = cfg.moe_router_topk if cfg.num_moe_experts else 1
    ffn = (
        (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size)
        if cfg.num_moe_experts
        else cfg.ffn_hidden_size
    )
    shared = (cfg.moe_shared_expert_intermediate_size or 0) if cfg.num_moe_experts else 0
    vocab = vocab_size or cfg.vocab_size
    attention = (1 + groups / heads + seq_length / h / 2) * query_ratio
    mlp = (ffn * experts + shared) / h * gated
    logits = vocab / (2 * layers * h)
    return 3 * 2 * 2 * layers * h * h * (attention + mlp + logits)
