"""DeepSeek-V3, Kimi-K2 and Moonlight recipes. Point checkpoint.pretrained_checkpoint at a local
HF folder (bf16, or an FP8 release: read as bf16) or a converted checkpoint: the architecture is
then read from it, whatever the sizes below say."""

from megabridge.models.deepseek_v3.bridge import DeepseekV3Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

# Routing: sigmoid, top-k within the best groups, weights renormalised and scaled.
_V3 = dict(rms_norm_eps=1e-6, rope_theta=10000.0, norm_topk_prob=True, routed_scaling_factor=2.5,
           n_shared_experts=1, tie_word_embeddings=False)  # fmt: skip
V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
KIMI_K2_YARN = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "deepseek_v3": dict(_V3, num_hidden_layers=61, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_attention_heads=128, vocab_size=129280,
                        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_scaling=V3_YARN),
    # Kimi-K2 (1T, 32B active): one expert group, its own YaRN. Released in FP8 (read as bf16).
    "kimi_k2": dict(_V3, num_hidden_layers=61, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_attention_heads=64, vocab_size=163840,
                    n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1,
                    first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    max_position_embeddings=131072, rope_theta=50000.0,
                    routed_scaling_factor=2.827, rope_scaling=KIMI_K2_YARN),
    # Moonlight-16B-A3B: no query low-rank projection, one group, rms_norm_eps 1e-5, no YaRN.
    "moonlight_16b_a3b": dict(_V3, num_hidden_layers=27, hidden_size=2048,
                              intermediate_size=11264, moe_intermediate_size=1408,
                              num_attention_heads=16, vocab_size=163840, n_routed_experts=64,
                              num_experts_per_tok=6, n_group=1, topk_group=1,
                              first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512,
                              qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                              n_shared_experts=2, max_position_embeddings=8192,
                              rope_theta=50000.0, rms_norm_eps=1e-5,
                              routed_scaling_factor=2.446),
}  # fmt: skip
TINY = dict(_V3, num_hidden_layers=3, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_attention_heads=4, vocab_size=256, n_routed_experts=4,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16)  # fmt: skip


def deepseek_v3_tiny_pretrain_config():
    """A tiny DeepSeek-V3-shaped model (MLA, 4 sigmoid-routed experts) on mock data (tests)."""
    return tiny_pretrain("deepseek_v3_tiny", sized(DeepseekV3Bridge, TINY))


def deepseek_v3_finetune_config():
    """SFT of DeepSeek-V3 (671B) on 512+ GPUs (TP=8 + SP, EP=64): set pretrained_checkpoint, dataset.

    Its 61 layers do not split evenly over pipeline stages, which megabridge needs,
    so the model is spread by tensor and expert parallelism only.
    """
    cfg = finetune("deepseek_v3_sft", sized(DeepseekV3Bridge, SIZES["deepseek_v3"]))
    cfg.train.global_batch_size = 128  # a multiple of the 64 data-parallel ranks
    m = cfg.model
    m.tensor_model_parallel_size, m.sequence_parallel, m.expert_model_parallel_size = 8, True, 64
    m.recompute_granularity, m.recompute_method, m.recompute_num_layers = "full", "uniform", 1
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def deepseek_v3_lora_config():
    """LoRA of DeepSeek-V3 (671B) on 512+ GPUs: set checkpoint.pretrained_checkpoint and dataset.path.

    Adapts MLA's output projection and the three dense layers' MLPs
    (lora.default_targets): MLA's down/up projections and the experts not yet.
    """
    return as_lora(deepseek_v3_finetune_config(), "deepseek_v3_lora")


def kimi_k2_finetune_config():
    """SFT of Kimi-K2 (1T, 32B active) on 1024+ GPUs (TP=8 + SP, EP=128): set pretrained_checkpoint
    (the FP8 release converts to bf16) and dataset.path.

    61 layers, as DeepSeek-V3: spread by tensor and expert parallelism only; the 384
    experts 3 to a rank; the data-parallel size (128 at 1024 GPUs) a multiple of EP.
    """
    cfg = finetune("kimi_k2_sft", sized(DeepseekV3Bridge, SIZES["kimi_k2"]))
    cfg.train.global_batch_size = 256
    m = cfg.model
    m.tensor_model_parallel_size, m.sequence_parallel, m.expert_model_parallel_size = 8, True, 128
    m.recompute_granularity, m.recompute_method, m.recompute_num_layers = "full", "uniform", 1
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def kimi_k2_lora_config():
    """LoRA of Kimi-K2 on 1024+ GPUs: MLA's output projection and the dense first layer's MLP."""
    return as_lora(kimi_k2_finetune_config(), "kimi_k2_lora")


def moonlight_16b_a3b_finetune_config():
    """SFT of Moonlight-16B-A3B on 8 GPUs (EP=8): set checkpoint.pretrained_checkpoint, dataset."""
    cfg = finetune("moonlight_16b_a3b_sft", sized(DeepseekV3Bridge, SIZES["moonlight_16b_a3b"]))
    cfg.model.expert_model_parallel_size = 8
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def moonlight_16b_a3b_lora_config():
    """LoRA of Moonlight-16B-A3B on 8 GPUs (EP=8): MLA's output projection and the dense MLP."""
    return as_lora(moonlight_16b_a3b_finetune_config(), "moonlight_16b_a3b_lora")
