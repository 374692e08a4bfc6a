"""Named blocks of parameter mappings that every family bridge composes.

Each block is a function returning the mappings (mappings.py) of one part of a
decoder: embeddings and output head, final norm, the layer norms, attention in
its variants, the MLP, routed and shared experts, the router. Its arguments are
the few names that differ between families (an HF prefix, the expert
projections' names); the Megatron side is always Megatron-Core's GPTModel, so it
is written here once. ``*`` stands for a layer (or expert) index, as in mappings.py.
"""

from __future__ import annotations

from megabridge.conversion.mappings import (
    QKV,
    FusedQKV,
    GatedMLP,
    Mapping,
    StackedExperts,
    renames,
)

LAYER = "decoder.layers.*"
HF_LAYER = "model.layers.*"
ATTENTION = f"{LAYER}.self_attention"
HF_ATTENTION = f"{HF_LAYER}.self_attn"
MLP = f"{LAYER}.mlp"
HF_MLP = f"{HF_LAYER}.mlp"

# The three projections of a gated MLP, as HF names them: (gate, up, down).
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
# Mixtral's experts: w1 is the gate, w3 the up and w2 the down projection.
W1_W3_W2 = ("w1", "w3", "w2")


# ------------------------------------------------------------------ ends of the model


def embeddings_and_head(hf_model: str = "model", hf_head: str = "lm_head") -> list[Mapping]:
    """Token embeddings and the output head (absent from HF folders with tied embeddings)."""
    return renames(
        {
            "embedding.word_embeddings.weight": f"{hf_model}.embed_tokens.weight",
            "output_layer.weight": f"{hf_head}.weight",
        }
    )


def final_norm(hf_model: str = "model") -> list[Mapping]:
    """The norm after the last layer."""
    return renames({"decoder.final_layernorm.weight": f"{hf_model}.norm.weight"})


# ------------------------------------------------------------------ layer norms


def pre_norms(hf_layer: str = HF_LAYER) -> list[Mapping]:
    """Norms on the attention and MLP inputs (Llama). HF calls the MLP's
    ``post_attention_layernorm``: it comes after attention, before the MLP."""
    return renames(
        {
            f"{LAYER}.input_layernorm.weight": f"{hf_layer}.input_layernorm.weight",
            f"{LAYER}.pre_mlp_layernorm.weight": f"{hf_layer}.post_attention_layernorm.weight",
        }
    )


def post_norms(hf_layer: str = HF_LAYER) -> list[Mapping]:
    """Norms on the attention and MLP outputs, before the residual add (OLMo 2). The same
    HF name ``post_attention_layernorm`` as in pre_norms, on the attention output here."""
    hf_post_attention = f"{hf_layer}.post_attention_layernorm.weight"
    return renames(
        {
            f"{LAYER}.post_self_attn_layernorm.weight": hf_post_attention,
            f"{LAYER}.post_mlp_layernorm.weight": f"{hf_layer}.post_feedforward_layernorm.weight",
        }
    )


def pre_post_norms(hf_layer: str = HF_LAYER) -> list[Mapping]:
    """Gemma's four norms a layer: on each sublayer's input (the MLP's is HF's
    ``pre_feedforward_layernorm`` here) and, as in post_norms, on its output."""
    pre = {
        f"{LAYER}.input_layernorm.weight": f"{hf_layer}.input_layernorm.weight",
        f"{LAYER}.pre_mlp_layernorm.weight": f"{hf_layer}.pre_feedforward_layernorm.weight",
    }
    return [*renames(pre), *post_norms(hf_layer)]


def sandwich_norms(hf_layer: str = HF_LAYER) -> list[Mapping]:
    """GLM-4's four norms a layer, Gemma's placement under other names: HF's
    ``post_attention_layernorm`` is the MLP's input norm (as in pre_norms), and the
    sublayer outputs are normed by ``post_self_attn_layernorm`` / ``post_mlp_layernorm``."""
    return [
        *pre_norms(hf_layer),
        *renames(
            {
                f"{LAYER}.post_self_attn_layernorm.weight": f"{hf_layer}.post_self_attn_layernorm.weight",
                f"{LAYER}.post_mlp_layernorm.weight": f"{hf_layer}.post_mlp_layernorm.weight",
            }
        ),
    ]


# ------------------------------------------------------------------ attention


def _output_projection(hf_attn: str) -> list[Mapping]:
    return renames({f"{ATTENTION}.linear_proj.weight": f"{hf_attn}.o_proj.weight"})


def attention(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """Separate q/k/v projections fused into linear_qkv, and o_proj."""
    return [
        *_output_projection(hf_attn),
        QKV(f"{ATTENTION}.linear_qkv.weight", tuple(f"{hf_attn}.{p}_proj.weight" for p in "qkv")),
    ]


def qkv_bias(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """Biases on q, k and v (not on o_proj: Qwen2), fused as their weights are."""
    return [QKV(f"{ATTENTION}.linear_qkv.bias", tuple(f"{hf_attn}.{p}_proj.bias" for p in "qkv"))]


def output_projection_bias(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """A bias on o_proj (GPT-OSS, with qkv_bias: Megatron's add_bias_linear)."""
    return renames({f"{ATTENTION}.linear_proj.bias": f"{hf_attn}.o_proj.bias"})


def attention_sinks(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """The learned per-head sink logits (GPT-OSS), named as Megatron's DotProductAttention."""
    return renames({f"{ATTENTION}.core_attention.softmax_offset": f"{hf_attn}.sinks"})


def fused_qkv_attention(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """One HF qkv_proj holding all queries, then all keys, then all values (Phi-3), o_proj."""
    return [
        *_output_projection(hf_attn),
        FusedQKV(f"{ATTENTION}.linear_qkv.weight", f"{hf_attn}.qkv_proj.weight"),
    ]


def qk_norm(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """RMSNorms on queries and keys. The same tensors whether the norm is per head (Qwen3,
    Gemma 3: weight [head_dim]) or over all heads at once (OLMo 2: weight [heads * head_dim],
    ModelConfig.qk_norm_across_heads), so one block serves both."""
    return renames(
        {
            f"{ATTENTION}.q_layernorm.weight": f"{hf_attn}.q_norm.weight",
            f"{ATTENTION}.k_layernorm.weight": f"{hf_attn}.k_norm.weight",
        }
    )


def mla_attention(hf_attn: str = HF_ATTENTION) -> list[Mapping]:
    """Multi-latent attention (DeepSeek-V3). Megatron-Core's MLASelfAttention holds the same
    matrices as transformers (per head [no-RoPE, RoPE] and [key, value]): renames only.
    linear_q_proj is the uncompressed query (q_lora_rank None); the others the low-rank ones."""
    return renames(
        {
            f"{ATTENTION}.linear_q_proj.weight": f"{hf_attn}.q_proj.weight",
            f"{ATTENTION}.linear_q_down_proj.weight": f"{hf_attn}.q_a_proj.weight",
            f"{ATTENTION}.q_layernorm.weight": f"{hf_attn}.q_a_layernorm.weight",
            f"{ATTENTION}.linear_q_up_proj.weight": f"{hf_attn}.q_b_proj.weight",
            f"{ATTENTION}.linear_kv_down_proj.weight": f"{hf_attn}.kv_a_proj_with_mqa.weight",
            f"{ATTENTION}.kv_layernorm.weight": f"{hf_attn}.kv_a_layernorm.weight",
            f"{ATTENTION}.linear_kv_up_proj.weight": f"{hf_attn}.kv_b_proj.weight",
            f"{ATTENTION}.linear_proj.weight": f"{hf_attn}.o_proj.weight",
        }
    )


# ------------------------------------------------------------------ MLPs and experts


def gated_mlp(
    megatron: str = MLP, hf: str = HF_MLP, names: tuple[str, str, str] = GATE_UP_DOWN
) -> list[Mapping]:
    """A gated MLP (SwiGLU / GeGLU): HF gate and up -> linear_fc1 = [gate; up], down -> fc2.
    ``megatron`` / ``hf`` are the module prefixes, so experts reuse it."""
    gate, up, down = names
    return [
        *renames({f"{megatron}.linear_fc2.weight": f"{hf}.{down}.weight"}),
        GatedMLP(f"{megatron}.linear_fc1.weight", (f"{hf}.{gate}.weight", f"{hf}.{up}.weight")),
    ]


def fused_gated_mlp(hf: str = HF_MLP) -> list[Mapping]:
    """HF's gate_up_proj (Phi-3) is [gate; up], the very layout of linear_fc1: renames."""
    return renames(
        {
            f"{MLP}.linear_fc1.weight": f"{hf}.gate_up_proj.weight",
            f"{MLP}.linear_fc2.weight": f"{hf}.down_proj.weight",
        }
    )


def routed_experts(
    hf_experts: str = f"{HF_MLP}.experts", names: tuple[str, str, str] = GATE_UP_DOWN
) -> list[Mapping]:
    """The routed experts, one gated MLP each: Megatron's local_experts.* (global indices
    here; sharding.py maps them to expert-parallel ranks) <- HF's ``hf_experts``.*."""
    return gated_mlp(f"{MLP}.experts.local_experts.*", f"{hf_experts}.*", names)


def shared_experts(
    hf: str = f"{HF_MLP}.shared_experts", hf_gate: str | None = None
) -> list[Mapping]:
    """The shared expert(s) every token goes through, as one gated MLP; with ``hf_gate`` its
    output is scaled by sigmoid(gate(x)) (Qwen2-MoE; Megatron's moe_shared_expert_gate)."""
    gate = {f"{MLP}.shared_experts.gate_weight": f"{hf_gate}.weight"} if hf_gate else {}
    return [*gated_mlp(f"{MLP}.shared_experts", hf), *renames(gate)]  # fmt: skip


def stacked_experts(hf_experts: str = f"{HF_MLP}.experts") -> list[Mapping]:
    """Experts stored as one tensor per projection for all experts of a layer, [in, out]
    per expert, gate and up columns interleaved, with biases (GPT-OSS)."""
    fc1, fc2 = (
        f"{MLP}.experts.local_experts.*.linear_fc1",
        f"{MLP}.experts.local_experts.*.linear_fc2",
    )
    return [
        StackedExperts(f"{fc1}.weight", f"{hf_experts}.gate_up_proj", True, True),
        StackedExperts(f"{fc1}.bias", f"{hf_experts}.gate_up_proj_bias", False, True),
        StackedExperts(f"{fc2}.weight", f"{hf_experts}.down_proj", True),
        StackedExperts(f"{fc2}.bias", f"{hf_experts}.down_proj_bias"),
    ]


def stacked_gated_experts(
    hf_experts: str = f"{HF_MLP}.experts", either_way: bool = False
) -> list[Mapping]:
    """Experts stacked as in stacked_experts, [in, out] per expert, but without biases and
    with gate and up as the two halves of gate_up_proj's columns (Llama 4:
    ``gate_up_proj`` [E, hidden, 2 * ffn], ``down_proj`` [E, ffn, hidden]). ``either_way``:
    [out, in] ones are read too (Qwen3-VL-MoE saved by transformers 5; StackedExperts)."""
    expert = f"{MLP}.experts.local_experts.*"
    fc1, fc2 = f"{expert}.linear_fc1.weight", f"{expert}.linear_fc2.weight"
    return [
        StackedExperts(fc1, f"{hf_experts}.gate_up_proj", True, either_way=either_way),
        StackedExperts(fc2, f"{hf_experts}.down_proj", True, either_way=either_way),
    ]


def router(
    hf: str = f"{HF_MLP}.gate", expert_bias: bool = False, bias: bool = False
) -> list[Mapping]:
    """The router's linear; with ``expert_bias`` the per-expert selection bias (DeepSeek-V3's
    e_score_correction_bias, Megatron's expert_bias); with ``bias`` the linear's own bias on
    the logits (GPT-OSS; Megatron's router has it under add_bias_linear)."""
    table = {f"{MLP}.router.weight": f"{hf}.weight"}
    if bias:
        table[f"{MLP}.router.bias"] = f"{hf}.bias"
    if expert_bias:
        table[f"{MLP}.router.expert_bias"] = f"{hf}.e_score_correction_bias"
    return renames(table)
