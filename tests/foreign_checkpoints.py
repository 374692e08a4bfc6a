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
        "pipeline_model_parallel_size": cfg.pipeline_model_parallel_size,
        **(_moe_fields(cfg) if cfg.num_moe_experts else {}),
    }


def _moe_fields(cfg) -> dict:
    """A Qwen3-MoE provider's extra fields (Megatron-Core's names, as Megatron-Bridge's
    Qwen3MoEModelProvider holds them)."""
    return {
        "qk_layernorm": True,
        "num_moe_experts": cfg.num_moe_experts,
        "moe_router_topk": cfg.moe_router_topk,
        "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
        "moe_router_pre_softmax": cfg.moe_router_pre_softmax,
        "moe_router_score_function": cfg.moe_router_score_function,
        "moe_router_load_balancing_type": cfg.moe_router_load_balancing_type,
        "moe_aux_loss_coeff": cfg.moe_aux_loss_coeff,
        "moe_grouped_gemm": True,
        "moe_token_dispatcher_type": "alltoall",
        "expert_model_parallel_size": cfg.expert_model_parallel_size,
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
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
        untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attention_backend=AttnBackend.auto,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        ckpt_format="torch_dist",
        **(_megatron_lm_moe_args(cfg) if cfg.num_moe_experts else {}),
    )


def _megatron_lm_moe_args(cfg) -> dict:
    """Megatron-LM's MoE arguments (arguments.py's names; none of them names the family)."""
    return dict(
        num_experts=cfg.num_moe_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_router_score_function=cfg.moe_router_score_function,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
        moe_router_load_balancing_type="aux_loss",  # the run's choice, not the model's
        moe_aux_loss_coeff=1e-2,
        moe_grouped_gemm=True,
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
        # what Megatron-Bridge 0.6.2 writes: its generic provider, the fields tell the model
        provider = "megatron.bridge.models.gpt_provider.GPTModelProvider"
        run_config = {
            "model": {"_target_": provider, **megatron_fields(cfg)},
            "train": {"train_iters": ITERATION, "micro_batch_size": 1},
            "checkpoint": {"save": str(root), "ckpt_format": "torch_dist"},
        }
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config))
        train_state = {"step": torch.tensor(ITERATION), "floating_point_operations_so_far": 0.0}
        torch.save(train_state, iter_dir / "train_state.pt")
        torch.save(train_state, root / "latest_train_state.pt")


# Other layouts, written in the same launch (2 processes): name -> (kind, which HF model,
# TP, PP, EP, bf16). Each tool's layout at one of them; every kind is also written at TP=2.
LAYOUTS = {
    "megatron-lm-tp2-bf16": ("megatron-lm", "bf16", 2, 1, 1, True),
    "nemo2-pp2": ("nemo2", "fp32", 1, 2, 1, False),
    "megatron-bridge-moe-ep2": ("megatron-bridge", "moe", 1, 1, 2, False),
    # Megatron-LM's MoE arguments name no family: the export infers Qwen3-MoE from them
    "megatron-lm-moe-ep2": ("megatron-lm", "moe", 1, 1, 2, False),
}


def _write_from(hf, kind: str, out: Path, tp=1, pp=1, ep=1, bf16=False) -> None:
    from megabridge import runtime
    from megabridge.conversion.auto_bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(hf)
    cfg = bridge.to_megatron_provider()
    cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size = tp, pp
    cfg.expert_model_parallel_size, cfg.bf16 = ep, bf16
    runtime.init_model_parallel(tp, pp, ep)  # a fresh parallel state for this layout
    write(kind, out, bridge.to_megatron_model(cfg), cfg)


def main(argv=None) -> None:
    """``[torchrun ...] python -m tests.foreign_checkpoints HF_DIR OUT_DIR [--tp N] [--bf16]
    [--layouts HF_BF16_DIR HF_MOE_DIR]``: writes every kind under OUT_DIR/<kind>, from the
    model loaded at TP=N, and with --layouts (2 processes) each of LAYOUTS under OUT_DIR/<name>
    from the fp32 model, a bf16 copy of it and a Qwen3-MoE model."""
    parser = argparse.ArgumentParser()
    parser.add_argument("hf")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--layouts", nargs=2, metavar=("HF_BF16", "HF_MOE"))
    args = parser.parse_args(argv)

    from megabridge.conversion.auto_bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(args.hf)
    cfg = bridge.to_megatron_provider()
    cfg.tensor_model_parallel_size, cfg.bf16 = args.tp, args.bf16
    model = bridge.to_megatron_model(cfg)
    for kind in KINDS:
        write(kind, Path(args.out) / kind, model, cfg)
    if args.layouts:
        sources = {"fp32": args.hf, "bf16": args.layouts[0], "moe": args.layouts[1]}
        for name, (kind, source, tp, pp, ep, bf16) in LAYOUTS.items():
            _write_from(sources[source], kind, Path(args.out) / name, tp, pp, ep, bf16)


if __name__ == "__main__":  # dist_checkpointing.save starts processes that re-import __main__
    main()
