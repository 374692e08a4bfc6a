"""DeepSeek-V3 recipes. Point checkpoint.pretrained_checkpoint at a local HF folder in bf16 (or a
converted checkpoint): the architecture is then read from it, whatever the sizes below say."""

from megabridge.models.config import ModelConfig
from megabridge.recipes import as_lora, finetune, tiny_pretrain

V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip


def _deepseek_v3(layers, hidden, ffn, moe_ffn, heads, vocab, experts, topk, groups, group_topk,
                 dense_layers, q_rank, kv_rank, nope, rope, v, rope_scaling):  # fmt: skip
    return ModelConfig(
        family="deepseek_v3", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
        num_attention_heads=heads, vocab_size=vocab, seq_length=4096, normalization="RMSNorm",
        activation="swiglu", position_embedding_type="rope", rotary_base=10000.0,
        rope_scaling=rope_scaling, layernorm_epsilon=1e-6, qk_layernorm=True,
        multi_latent_attention=True, q_lora_rank=q_rank, kv_lora_rank=kv_rank,
        qk_head_dim=nope, qk_pos_emb_head_dim=rope, v_head_dim=v,
        num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=moe_ffn,
        moe_layer_freq=[0] * dense_layers + [1] * (layers - dense_layers),
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5, moe_router_num_groups=groups,
        moe_router_group_topk=group_topk, moe_router_dtype="fp32",
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-4,
    )  # fmt: skip


def deepseek_v3_tiny_pretrain_config():
    """A tiny DeepSeek-V3-shaped model (MLA, 4 sigmoid-routed experts) on mock data (tests)."""
    model = _deepseek_v3(3, 64, 96, 32, 4, 256, 4, 2, 2, 1, 1, 32, 16, 16, 8, 16, {})
    return tiny_pretrain("deepseek_v3_tiny", model)


def deepseek_v3_finetune_config():
    """SFT of DeepSeek-V3 (671B) on 512+ GPUs (TP=8 + SP, EP=64): set pretrained_checkpoint, dataset.

    Its 61 layers do not split evenly over pipeline stages, which megabridge needs,
    so the model is spread by tensor and expert parallelism only.
    """
    model = _deepseek_v3(61, 7168, 18432, 2048, 128, 129280, 256, 8, 8, 4, 3,
                         1536, 512, 128, 64, 128, V3_YARN)  # fmt: skip
    cfg = finetune("deepseek_v3_sft", model)
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
