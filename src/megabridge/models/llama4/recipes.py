"""Llama 4 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (Scout and
Maverick are published as Llama4ForConditionalGeneration: read as their language model) or a
converted checkpoint: the architecture is then read from it, whatever the sizes below say.

Layouts are sized for H200s (141 GB), 8 a node: bf16 weights and fp32 gradients (6 bytes a
parameter of the GPU's share) and the distributed optimizer (12 bytes a parameter, shared
over the parameter's data-parallel ranks), leaving room for activations.
"""

from megabridge.models.llama4.bridge import Llama4Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

# Both: 48 layers, hidden 5120, 40 heads / 8 KV heads of 128, top-1 of the experts plus a
# shared expert of 8192, dense layers of 16384, chunked attention (8192) on the RoPE layers,
# every 4th layer NoPE with temperature tuning.
_LLAMA4 = dict(num_hidden_layers=48, hidden_size=5120, intermediate_size=8192,
               intermediate_size_mlp=16384, num_attention_heads=40, num_key_value_heads=8,
               head_dim=128, vocab_size=202048, rms_norm_eps=1e-5, num_experts_per_tok=1,
               attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
               attn_scale=0.1, rope_theta=500000.0, router_aux_loss_coef=0.001,
               tie_word_embeddings=False, bos_token_id=200000,
               eos_token_id=[200001, 200007, 200008], pad_token_id=200018)  # fmt: skip
# HF config.json text_config fields of each size; tests/data/hf_configs/<size>.json is the
# released one (text_config of the published Llama4ForConditionalGeneration).
SIZES = {
    # 109B (17B active): every layer MoE over 16 experts, QK norm, llama3 RoPE scaling.
    "llama4_scout_17b_16e": dict(_LLAMA4, num_local_experts=16, interleave_moe_layer_step=1,
                                 use_qk_norm=True, max_position_embeddings=10485760,
                                 rope_scaling={"rope_type": "llama3", "factor": 16.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                               "original_max_position_embeddings": 8192}),
    # 400B (17B active): MoE on every other layer over 128 experts, no QK norm, plain RoPE.
    "llama4_maverick_17b_128e": dict(_LLAMA4, num_local_experts=128,
                                     interleave_moe_layer_step=2, use_qk_norm=False,
                                     max_position_embeddings=1048576),
}  # fmt: skip
TINY = dict(_LLAMA4, num_hidden_layers=4, hidden_size=64, intermediate_size=32,
            intermediate_size_mlp=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256, num_local_experts=4, interleave_moe_layer_step=2, use_qk_norm=True,
            attention_chunk_size=32, floor_scale=16, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=None)  # fmt: skip


def llama4_tiny_pretrain_config():
    """A tiny Llama 4-shaped model (4 experts, top-1 + shared, chunks of 32, a NoPE layer) on
    mock data (tests, smoke runs)."""
    return tiny_pretrain("llama4_tiny", sized(Llama4Bridge, TINY))


def llama4_scout_17b_16e_finetune_config():
    """SFT of Llama 4 Scout (109B) on 32 H200s (4 nodes: TP=2, PP=2, EP=8): set
    checkpoint.pretrained_checkpoint and dataset.path.

    Per GPU: 3B expert parameters (18 GB, and 36 GB of optimizer state: one expert-data-
    parallel rank) and 2.75B others (17 GB, their optimizer state shared over 8): ~75 GB.
    """
    cfg = finetune("llama4_scout_sft", sized(Llama4Bridge, SIZES["llama4_scout_17b_16e"]))
    m = cfg.model
    m.tensor_model_parallel_size, m.sequence_parallel = 2, True
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 2, 8
    m.moe_router_dtype = "fp32"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def llama4_scout_17b_16e_lora_config():
    """LoRA of Llama 4 Scout (109B) on 8 H200s (one node: EP=8; 46 GB of frozen bf16 weights
    a GPU): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(llama4_scout_17b_16e_finetune_config(), "llama4_scout_lora")
    m = cfg.model
    m.tensor_model_parallel_size, m.sequence_parallel = 1, False
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 1, 8
    return cfg


def llama4_maverick_17b_128e_finetune_config():
    """SFT of Llama 4 Maverick (400B) on 128 H200s (16 nodes: PP=4, EP=32): set
    checkpoint.pretrained_checkpoint and dataset.path.

    Per GPU: 3B expert parameters (18 GB, and 36 GB of optimizer state: one expert-data-
    parallel rank) and 3.5B others (21 GB, their optimizer state shared over 32): ~77 GB.
    """
    cfg = finetune("llama4_maverick_sft", sized(Llama4Bridge, SIZES["llama4_maverick_17b_128e"]))
    cfg.train.global_batch_size = 32  # a multiple of the 32 data-parallel ranks
    m = cfg.model
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 4, 32
    m.moe_router_dtype = "fp32"  # 128 experts: route in fp32
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def llama4_maverick_17b_128e_lora_config():
    """LoRA of Llama 4 Maverick (400B) on 16 H200s (2 nodes: PP=2, EP=8; 62 GB of frozen
    bf16 weights a GPU): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = as_lora(llama4_maverick_17b_128e_finetune_config(), "llama4_maverick_lora")
    cfg.train.global_batch_size = 16
    m = cfg.model
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 2, 8
    return cfg
