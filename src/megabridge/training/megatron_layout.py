"""The reverse of foreign.py: a converted checkpoint that Megatron-LM and Megatron-Bridge load.

``megabridge convert hf-to-megatron --megatron-layout`` makes the output a save folder
as both tools lay it out, with megabridge's checkpoint as its one iteration::

    OUT/latest_checkpointed_iteration.txt   "0"   (Megatron-LM's and Megatron-Bridge's tracker)
    OUT/latest_train_state.pt                     (Megatron-Bridge's tracker)
    OUT/iter_0000000/                             megabridge's checkpoint, plus:
      common.pt       + args (Megatron-LM's argparse Namespace: the model's arguments and
                        its parallel sizes, which Megatron-LM reads on load),
                        checkpoint_version, iteration
      run_config.yaml   Megatron-Bridge's run config: the model provider's fields
      train_state.pt    Megatron-Bridge's train state (step 0)

megabridge itself reads OUT like any save folder (its newest complete checkpoint).
Megatron-LM's own loader (core_v0.16.1: load_args_from_checkpoint, then load_checkpoint)
reads it: scripts/megatron_lm_load_check.py runs that code from a checkout and compares
the loaded model's logits with transformers'; scripts/megatron_bridge_load_check.py does the
same with Megatron-Bridge 0.6.2's (its tracker, run_config.yaml into its provider, the load).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from megabridge.errors import UserError
from megabridge.training import checkpointing, integrity, trust

ITER = "iter_0000000"
# Megatron-Bridge 0.6 describes Llama, Qwen2 and Qwen3 with its generic provider (its family
# bridges set the fields; its llama_provider / qwen_provider modules are gone): the class it
# instantiates from run_config.yaml (scripts/megatron_bridge_load_check.py loads ours).
_GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"


def megatron_fields(cfg) -> dict:
    """The model's Megatron-Core config fields, as Megatron-Bridge and NeMo 2 store them."""
    if cfg.activation != "swiglu" or cfg.num_moe_experts:
        raise UserError(
            f"--megatron-layout: only dense SwiGLU models are supported yet ({cfg.family} "
            f"has activation {cfg.activation}, {cfg.num_moe_experts or 0} experts)"
        )
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_query_groups or cfg.num_attention_heads,
        "kv_channels": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "seq_length": cfg.seq_length,
        "normalization": cfg.normalization,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": cfg.add_bias_linear,
        "add_qkv_bias": cfg.add_qkv_bias,
        "qk_layernorm": cfg.qk_layernorm,
        "position_embedding_type": cfg.position_embedding_type,
        "rotary_base": cfg.rotary_base,
        "rotary_percent": cfg.rotary_percent,
        "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
        "bf16": bool(cfg.bf16),
        "tensor_model_parallel_size": cfg.tensor_model_parallel_size,
        "pipeline_model_parallel_size": cfg.pipeline_model_parallel_size,
    }


def megatron_lm_args(cfg, padded_vocab: int | None = None) -> argparse.Namespace:
    """Megatron-LM's arguments for the model, named as its arguments.py names them."""
    from megatron.core.transformer.enums import AttnBackend

    fields = megatron_fields(cfg)
    return argparse.Namespace(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        group_query_attention=fields["num_query_groups"] != cfg.num_attention_heads,
        num_query_groups=fields["num_query_groups"],
        kv_channels=cfg.kv_channels,
        padded_vocab_size=padded_vocab or cfg.vocab_size,
        max_position_embeddings=cfg.seq_length,
        seq_length=cfg.seq_length,
        normalization=cfg.normalization,
        norm_epsilon=cfg.layernorm_epsilon,
        swiglu=True,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        position_embedding_type=cfg.position_embedding_type,
        rotary_base=int(cfg.rotary_base),
        rotary_percent=cfg.rotary_percent,
        untie_embeddings_and_output_weights=not cfg.share_embeddings_and_output_weights,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        bf16=bool(cfg.bf16),
        attention_backend=AttnBackend.auto,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        ckpt_format="torch_dist",
    )


def train_state(iteration: int = 0) -> dict:
    """Megatron-Bridge's train_state.pt."""
    return {
        "step": torch.tensor(iteration, dtype=torch.int32),
        "consumed_train_samples": torch.tensor(0, dtype=torch.int32),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int32),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int32),
        "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float64),
        "do_train": torch.tensor(False),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }


def write(out: Path, cfg) -> Path:
    """Turn the converted checkpoint folder ``out`` into the save folder above (rank 0).

    ``out`` keeps its name throughout: the checkpoint moves into a staging folder that
    then takes ``out``'s place; the files the tools need are written before megabridge.json
    is sealed again with every file's size.
    """
    out = Path(out)
    fields = megatron_fields(cfg)  # refuse what the tools' layout cannot describe, first
    staging = out.with_name(f".{out.name}.layout")
    if staging.exists():  # of a run killed here before
        shutil.rmtree(staging)
    staging.mkdir()
    os.rename(out, staging / ITER)
    ckpt = staging / ITER
    common = trust.load_common_state(ckpt) or {}
    rows = trust.read_metadata(ckpt).state_dict_metadata["embedding.word_embeddings.weight"]
    common.update(
        args=megatron_lm_args(cfg, int(rows.size[0])), checkpoint_version=3.0, iteration=0
    )
    _save_atomic(common, ckpt / "common.pt")
    config = {
        "model": {"_target_": _GPT_PROVIDER, **fields},
        "checkpoint": {"ckpt_format": "torch_dist"},
    }
    checkpointing.write_text_atomic(ckpt / "run_config.yaml", yaml.safe_dump(config))
    _save_atomic(train_state(), ckpt / "train_state.pt")
    _save_atomic(train_state(), staging / "latest_train_state.pt")
    meta = json.loads((ckpt / checkpointing.METADATA).read_text())
    # re-sealed: the files added here get their sizes and checksums recorded too
    records, sealed = integrity.file_records(ckpt), checkpointing.METADATA
    meta["files"] = {n: size for n, size in records["files"].items() if n != sealed}
    sums = records["checksums"]
    meta["checksums"] = {**sums, "files": {n: d for n, d in sums["files"].items() if n != sealed}}
    checkpointing.write_json_atomic(ckpt / checkpointing.METADATA, meta)
    checkpointing.write_text_atomic(staging / checkpointing.LATEST, "0")
    os.rename(staging, out)
    return out


def _save_atomic(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
