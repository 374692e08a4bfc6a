"""DeepSeek-V3 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder in bf16 (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.deepseek_v3.bridge import DeepseekV3Bridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

# Routing: sigmoid, top-k within the best groups, weights renormalised and scaled.
_V3 = dict(rms_norm_eps=1e-6, rope_theta=10000.0, norm_topk_prob=True, routed_scaling_factor=2.5,
           n_shared_experts=1, tie_word_embeddings=False)  # fmt: skip
V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "deepseek_v3": dict(_V3, num_hidden_layers=61, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_attention_heads=128, vocab_size=129280,
                        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_scaling=V3_YARN),
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
