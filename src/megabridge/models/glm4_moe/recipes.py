"""GLM-4.5 / 4.5-Air recipes. Point checkpoint.pretrained_checkpoint at a local HF folder in bf16
(or a converted checkpoint): the architecture is then read from it, whatever the sizes say.

The layouts are estimates from parameter counts (bf16 weights and gradients, fp32 Adam
states spread by the distributed optimizer), not yet measured."""

from megabridge.models.glm4_moe.bridge import Glm4MoeBridge
from megabridge.recipes import as_lora, finetune, sized, tiny_pretrain

_GLM45 = dict(vocab_size=151552, rms_norm_eps=1e-5, rope_theta=1e6, partial_rotary_factor=0.5,
              attention_bias=True, head_dim=128, num_attention_heads=96, num_key_value_heads=8,
              n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
              norm_topk_prob=True, tie_word_embeddings=False)  # fmt: skip
# HF config.json fields of each size; tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "glm45_air": dict(_GLM45, num_hidden_layers=46, hidden_size=4096, intermediate_size=10944,
                      moe_intermediate_size=1408, n_routed_experts=128, first_k_dense_replace=1,
                      routed_scaling_factor=1.0, use_qk_norm=False),
    "glm45": dict(_GLM45, num_hidden_layers=92, hidden_size=5120, intermediate_size=12288,
                  moe_intermediate_size=1536, n_routed_experts=160, first_k_dense_replace=3,
                  routed_scaling_factor=2.5, use_qk_norm=True),
}  # fmt: skip
TINY = dict(_GLM45, num_hidden_layers=2, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
            routed_scaling_factor=2.5, use_qk_norm=True, num_nextn_predict_layers=0)  # fmt: skip


def glm4_moe_tiny_pretrain_config():
    """A tiny GLM-4.5-shaped model (4 sigmoid-routed experts, a shared one) on mock data."""
    return tiny_pretrain("glm4_moe_tiny", sized(Glm4MoeBridge, TINY))


def glm45_air_finetune_config():
    """SFT of GLM-4.5-Air (106B-A12B), sized for 32 H200 (EP=8, PP=2, distributed optimizer):
    set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("glm45_air_sft", sized(Glm4MoeBridge, SIZES["glm45_air"]))
    cfg.train.global_batch_size = 64  # a multiple of the 16 data-parallel ranks
    cfg.model.expert_model_parallel_size, cfg.model.pipeline_model_parallel_size = 8, 2
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def glm45_air_lora_config():
    """LoRA of GLM-4.5-Air at the SFT layout: set checkpoint.pretrained_checkpoint and
    dataset.path. Adapts attention and the dense layer (lora.default_targets), not the experts."""
    return as_lora(glm45_air_finetune_config(), "glm45_air_lora")


def glm45_finetune_config():
    """SFT of GLM-4.5 (355B-A32B), sized for 128 H200 (TP=2 + SP, PP=4, EP=16, distributed
    optimizer, full recompute): set checkpoint.pretrained_checkpoint and dataset.path."""
    cfg = finetune("glm45_sft", sized(Glm4MoeBridge, SIZES["glm45"]))
    cfg.train.global_batch_size = 128  # a multiple of the 16 data-parallel ranks
    m = cfg.model
    m.tensor_model_parallel_size, m.sequence_parallel = 2, True
    m.pipeline_model_parallel_size, m.expert_model_parallel_size = 4, 16
    m.recompute_granularity, m.recompute_method, m.recompute_num_layers = "full", "uniform", 1
    cfg.optimizer.use_distributed_optimizer = True
    return cfg
