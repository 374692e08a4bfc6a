"""Checkpoints as Megatron-LM, Megatron-Bridge and NeMo 2 write them, made in tests.

The weights are saved by Megatron-Core's own ``dist_checkpointing.save`` from a model
loaded from a tiny HF folder (at whatever TP the caller runs); each tool's files are
added beside them as its documentation and code describe them:

* Megatron-LM: ``iter_NNNNNNN/`` whose common state holds ``args`` (an argparse
  Namespace of the run's arguments), ``checkpoint_version`` and ``iteration``, and
  ``latest_checkpointed_iteration.txt`` beside it;
* Megatron-Bridge: the same layout, no ``args``, and ``iter_NNNNNNN/run_config.yaml``
  whose ``model`` section holds the provider's fields (Megatron-Core config names)
  and its class under ``_target_``; ``train_state.pt`` / ``latest_train_state.pt``;
* NeMo 2: ``<ckpt>/context/model.yaml`` (``config``: the same fields), ``context/io.json``
  and ``<ckpt>/weights/`` with the model keys prefixed ``module.``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

KINDS = ("megatron-lm", "megatron-bridge", "nemo2")
ITERATION = 10


def megatron_fields(cfg) -> dict:
    """The model's Megatron-Core config fields, as Megatron-Bridge / NeMo write them."""
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups,
        "kv_channels": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "seq_length": cfg.seq_length,
        "normalization": cfg.normalization,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "qk_layernorm": False,
        "position_embedding_type": "rope",
        "rotary_base": cfg.rotary_base,
        "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
        "bf16": bool(cfg.bf16),
        "tensor_model_parallel_size": cfg.tensor_model_parallel_size,
    }


def megatron_lm_args(cfg, padded_vocab: int):
    """Megatron-LM's arguments for the model (names as its arguments.py spells them)."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=True,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        padded_vocab_size=padded_vocab,
        vocab_size=None,
        max_position_embeddings=cfg.seq_length,
        seq_length=16,
        normalization=cfg.normalization,
        norm_epsilon=cfg.layernorm_epsilon,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attention_backend=AttnBackend.auto,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        ckpt_format="torch_dist",
    )


def write(kind: str, root: Path, model_chunks, cfg) -> Path:
    """Save ``model_chunks`` (every rank calls this) as ``kind`` writes it under ``root``.

    Returns the folder to point megabridge at (the save folder or NeMo's checkpoint).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    from megabridge.training.checkpointing import _in_process_results_queue

    root = Path(root)
    iter_dir = root / f"iter_{ITERATION:07d}"
    weights = root / "weights" if kind == "nemo2" else iter_dir
    prefix = "module." if kind == "nemo2" else ""
    (model,) = [unwrap_model(m) for m in model_chunks]
    state = {"model": model.sharded_state_dict(prefix=prefix)}
    if kind == "megatron-lm":
        state.update(
            args=megatron_lm_args(cfg, model.embedding.word_embeddings.num_embeddings_per_partition
                                  * cfg.tensor_model_parallel_size),
            checkpoint_version=3.0,
            iteration=ITERATION,
        )  # fmt: skip
    if dist.get_rank() == 0:
        weights.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _in_process_results_queue()
    dist_checkpointing.save(state, str(weights))
    dist.barrier()
    if dist.get_rank() == 0:
        _add_tool_files(kind, root, iter_dir, cfg)
    dist.barrier()
    return root


def _add_tool_files(kind: str, root: Path, iter_dir: Path, cfg) -> None:
    if kind == "nemo2":
        context = root / "context"
        context.mkdir()
        model = {
            "_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
            "config": {
                "_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig",
                **megatron_fields(cfg),
            },
        }
        (context / "model.yaml").write_text(yaml.safe_dump(model))
        (context / "io.json").write_text("{}\n")
        return
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    if kind == "megatron-bridge":
        run_config = {
            "model": {
                "_target_": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider",
                **megatron_fields(cfg),
            },
            "train": {"train_iters": ITERATION, "micro_batch_size": 1},
            "checkpoint": {"save": str(root), "ckpt_format": "torch_dist"},
        }
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config))
        train_state = {"step": torch.tensor(ITERATION), "floating_point_operations_so_far": 0.0}
        torch.save(train_state, iter_dir / "train_state.pt")
        torch.save(train_state, root / "latest_train_state.pt")


def main(argv=None) -> None:
    """``[torchrun ...] python -m tests.foreign_checkpoints HF_DIR OUT_DIR [--tp N] [--bf16]``:
    writes every kind under OUT_DIR/<kind>, from the model loaded at TP=N."""
    parser = argparse.ArgumentParser()
    parser.add_argument("hf")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    from megabridge.conversion.auto_bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(args.hf)
    cfg = bridge.to_megatron_provider()
    cfg.tensor_model_parallel_size, cfg.bf16 = args.tp, args.bf16
    model = bridge.to_megatron_model(cfg)
    for kind in KINDS:
        write(kind, Path(args.out) / kind, model, cfg)


if __name__ == "__main__":  # dist_checkpointing.save starts processes that re-import __main__
    main()
