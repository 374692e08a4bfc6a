"""DeepSeek-V2 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.deepseek_v2.bridge import DeepseekV2Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

# Softmax routing, top 6 of the experts, not renormalised; V2's YaRN (mscale 0.707).
_V2 = dict(rms_norm_eps=1e-6, rope_theta=10000.0, norm_topk_prob=False, n_shared_experts=2,
           num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, qk_nope_head_dim=128,
           qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, max_position_embeddings=163840,
           tie_word_embeddings=False,
           rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707})  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "deepseek_v2_lite": dict(_V2, num_hidden_layers=27, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_attention_heads=16,
                             n_routed_experts=64, q_lora_rank=None, routed_scaling_factor=1.0,
                             topk_method="greedy", n_group=1, topk_group=1),
    "deepseek_v2": dict(_V2, num_hidden_layers=60, hidden_size=5120, intermediate_size=12288,
                        moe_intermediate_size=1536, num_attention_heads=128, n_routed_experts=160,
                        q_lora_rank=1536, routed_scaling_factor=16.0,
                        topk_method="group_limited_greedy", n_group=8, topk_group=3),
}  # fmt: skip
TINY = dict(_V2, num_hidden_layers=3, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_attention_heads=4, vocab_size=256, n_routed_experts=4,
            num_experts_per_tok=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0, topk_method="greedy",
            n_group=1, topk_group=1, max_position_embeddings=4096, rope_scaling=None)  # fmt: skip


def deepseek_v2_tiny_pretrain_config():
    """A tiny DeepSeek-V2-Lite-shaped model (MLA, 4 softmax-routed experts) on mock data (tests)."""
    return tiny_pretrain("deepseek_v2_tiny", sized(DeepseekV2Bridge, TINY))


def deepseek_v2_lite_finetune_config():
    """SFT of DeepSeek-V2-Lite (16B, 2.4B active) on 8 GPUs (EP=8): set pretrained_checkpoint, dataset."""
    cfg = finetune("deepseek_v2_lite_sft", sized(DeepseekV2Bridge, SIZES["deepseek_v2_lite"]))
    cfg.model.expert_model_parallel_size = 8
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def deepseek_v2_lite_lora_config():
    """LoRA of DeepSeek-V2-Lite on 8 GPUs (EP=8): MLA's output projection and the dense MLP."""
    return as_lora(deepseek_v2_lite_finetune_config(), "deepseek_v2_lite_lora")


def deepseek_v2_finetune_config():
    """SFT of DeepSeek-V2 (236B, 21B active) on 256+ GPUs (TP=8 + SP, PP=4, EP=8).

    60 layers over 4 pipeline stages; the 160 experts 20 to a rank; the data-parallel
    size (8 at 256 GPUs) must be a multiple of EP.
    """
    cfg = finetune("deepseek_v2_sft", sized(DeepseekV2Bridge, SIZES["deepseek_v2"]))
    cfg.train.global_batch_size = 128
    m = cfg.model
    m.tensor_model_parallel_size, m.sequence_parallel = 8, True
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 4, 8
    m.recompute_granularity, m.recompute_method, m.recompute_num_layers = "full", "uniform", 1
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def deepseek_v2_lora_config():
    """LoRA of DeepSeek-V2 (236B) on 256+ GPUs: MLA's output projection and the dense MLP."""
    return as_lora(deepseek_v2_finetune_config(), "deepseek_v2_lora")
