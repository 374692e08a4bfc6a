"""Vanilla GPT (GPT-2 style: LayerNorm, GELU, biases, learned positions), trained from scratch."""

from megabridge.training.config import ConfigContainer


def vanilla_gpt_pretrain_config() -> ConfigContainer:
    """A small GPT on mock data that trains in seconds on a laptop CPU."""
    cfg = ConfigContainer(name="vanilla_gpt")
    m = cfg.model
    m.family = "gpt"
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 2, 128, 512
    m.num_attention_heads, m.vocab_size, m.seq_length = 4, 1024, 128
    m.normalization, m.activation = "LayerNorm", "gelu"
    m.add_bias_linear, m.position_embedding_type = True, "learned_absolute"
    m.share_embeddings_and_output_weights = True
    cfg.train.train_iters = 20
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    cfg.optimizer.lr, cfg.optimizer.min_lr = 3e-3, 3e-4
    cfg.scheduler.lr_warmup_iters = 2
    cfg.checkpoint.save_interval = 10
    cfg.train.eval_interval, cfg.train.eval_iters = 10, 1
    return cfg
