"""Megatron-Core distributed checkpoints: atomic saves, safe resumes.

Layout of ``checkpoint.save``::

    iter_0000005/                  one complete checkpoint (dist_checkpointing files
      megabridge.json              + what megabridge needs to trust it)
    iter_0000010/
    latest_checkpointed_iteration.txt

A checkpoint is written into a hidden ``.tmp-iter_*`` sibling and renamed into
place only when every rank has finished: a crash mid-save leaves no folder that
looks complete. ``megabridge.json`` records the model's architecture; a resume
into a different model stops with the fields that differ.

A converted HF model (``megabridge convert hf-to-megatron``) is a single
checkpoint folder of the same kind, at iteration 0.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megabridge.errors import CheckpointError

log = logging.getLogger(__name__)

METADATA = "megabridge.json"
LATEST = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1

# ModelConfig fields that decide tensor names and shapes: a checkpoint made with
# other values belongs to another model.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "normalization",
    "activation",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "position_embedding_type",
    "share_embeddings_and_output_weights",
    "num_moe_experts",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_layer_freq",
    "moe_shared_expert_gate",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
)


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def architecture(model_cfg) -> dict:
    """The shape-deciding fields, with defaults resolved (kv_channels None == hidden / heads)."""
    data = asdict(model_cfg)
    data["num_query_groups"] = data["num_query_groups"] or data["num_attention_heads"]
    data["kv_channels"] = data["kv_channels"] or data["hidden_size"] // data["num_attention_heads"]
    if data["num_moe_experts"]:
        data["moe_ffn_hidden_size"] = data["moe_ffn_hidden_size"] or data["ffn_hidden_size"]
    return {k: data[k] for k in ARCHITECTURE_FIELDS}


def model_config_from_dict(data: dict):
    """A ModelConfig from a checkpoint's megabridge.json (fields it does not know are dropped)."""
    from dataclasses import fields

    from megabridge.training.config import ModelConfig

    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in names})


def read_metadata(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / METADATA
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir} is not a megabridge checkpoint (no {METADATA})"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupted: {e}") from None


def is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / METADATA).is_file() and (ckpt_dir / "metadata.json").is_file()


def resolve(path: str | Path) -> Path:
    """The checkpoint folder to load from ``path``: itself, or its latest complete one."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    if is_complete(root):
        return root
    candidates = sorted(p for p in root.glob("iter_*") if p.is_dir())
    latest_file = root / LATEST
    if latest_file.is_file():
        named = root / iter_dirname(int(latest_file.read_text().strip() or -1))
        if named in candidates:
            candidates = [p for p in candidates if p <= named]
    for ckpt in reversed(candidates):
        if is_complete(ckpt):
            return ckpt
        log.warning("skipping incomplete checkpoint %s", ckpt)
    raise CheckpointError(f"no complete checkpoint in {root}")


def latest(root: str | Path) -> Path | None:
    try:
        return resolve(root)
    except CheckpointError:
        return None


def check_architecture(ckpt_dir: Path, model_cfg) -> dict:
    """Refuse a checkpoint made for another model; returns its metadata."""
    meta = read_metadata(ckpt_dir)
    saved = meta.get("model", {})
    current = architecture(model_cfg)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
        for k, v in current.items()
        if k in saved and saved[k] != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was made for another model ({'; '.join(diffs)})"
        )
    return meta


# ------------------------------------------------------------------ state dicts


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
    )


def _sharded_state_dict(model_chunks, optimizer=None, scheduler=None, extra=None, loading=False):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.utils import unwrap_model

    (model,) = [unwrap_model(m) for m in model_chunks]
    sd = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        meta = {"distrib_optim_sharding_type": "fully_reshardable"}
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd["model"], is_loading=loading, metadata=meta
        )
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    if extra is not None:
        sd.update(extra)
        pp, pp_rank, tp, tp_rank = _layout()
        sd["rng_state"] = ShardedObject(
            "rng_state",
            _rng_state(),
            (pp, tp),
            (pp_rank, tp_rank),
            replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
        )
    return sd


# ------------------------------------------------------------------------ save


def save(
    root: str | Path,
    iteration: int,
    model_chunks,
    optimizer,
    scheduler,
    train_state: dict,
    model_cfg,
    extra_metadata: dict | None = None,
    keep_last_n: int | None = None,
) -> Path:
    """Write ``root/iter_<iteration>`` atomically; returns its path."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / iter_dirname(iteration)
    tmp = root / f".tmp-{final.name}"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state_dict(
        model_chunks, optimizer, scheduler, extra={"train_state": dict(train_state)}
    )
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank0:
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "train_state": dict(train_state),
            "model": architecture(model_cfg),
            "model_config": asdict(model_cfg),
            "layout": {
                "tensor_model_parallel_size": model_cfg.tensor_model_parallel_size,
                "pipeline_model_parallel_size": model_cfg.pipeline_model_parallel_size,
            },
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra_metadata or {}),
        }
        write_json_atomic(tmp / METADATA, meta)
        _replace_dir(tmp, final)
        write_text_atomic(root / LATEST, str(iteration))
        if keep_last_n:
            prune(root, keep_last_n)
    dist.barrier()
    return final


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


def prune(root: Path, keep_last_n: int) -> None:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (and stale temp dirs)."""
    complete = sorted(p for p in root.glob("iter_*") if is_complete(p))
    for old in complete[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------ load


def load(ckpt_dir: Path, model_chunks, optimizer=None, scheduler=None, model_only=False) -> dict:
    """Load a checkpoint into the (already built) model, optimizer and scheduler.

    Returns the saved train_state ({} for model-only loads). The checkpoint may
    have been written at another TP/PP layout: dist_checkpointing reshards.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    meta = read_metadata(ckpt_dir)
    if model_only:
        sd = _sharded_state_dict(model_chunks)
    else:
        sd = _sharded_state_dict(
            model_chunks, optimizer, scheduler, extra={"train_state": {}}, loading=True
        )
        same_layout = meta.get("layout") == _layout_dict()
        if not same_layout:  # RNG streams are per (pp, tp) rank: only meaningful at the same layout
            sd.pop("rng_state")
    try:
        state = dist_checkpointing.load(sd, str(ckpt_dir))
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir}: {type(e).__name__}: {e}") from e
    (model,) = [unwrap_model(m) for m in model_chunks]
    model.load_state_dict(state["model"], strict=True)
    if model_only:
        return {}
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return dict(state["train_state"])


def _layout_dict() -> dict:
    pp, _, tp, _ = _layout()
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}


def save_model(
    out: str | Path,
    model_chunks,
    model_cfg,
    extra_metadata: dict | None = None,
    overwrite: bool = False,
    assets: Path | None = None,
) -> Path:
    """A model-only checkpoint folder at ``out`` (iteration 0), written atomically.

    ``assets``: a folder whose HF sidecar files (tokenizer, generation config) are
    kept in ``out/hf_assets`` so the checkpoint can become an HF folder again.
    """
    from megatron.core import dist_checkpointing

    from megabridge.conversion.hf_io import SIDECAR_FILES
    from megabridge.errors import UserError

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    rank0 = dist.get_rank() == 0
    problem = [None]
    if rank0:
        if out.exists() and not overwrite:
            problem[0] = f"output {out} already exists (pass --overwrite to replace it)"
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    dist.broadcast_object_list(problem, src=0)  # every rank learns rank 0's verdict
    if problem[0]:
        raise UserError(problem[0])
    dist_checkpointing.save(_sharded_state_dict(model_chunks), str(tmp))
    dist.barrier()
    if rank0:
        if assets is not None:
            (tmp / "hf_assets").mkdir()
            for name in SIDECAR_FILES:
                if (Path(assets) / name).is_file():
                    shutil.copy2(Path(assets) / name, tmp / "hf_assets" / name)
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": 0,
            "train_state": {},
            "model": architecture(model_cfg),
            "model_config": asdict(model_cfg),
            "layout": _layout_dict(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **(extra_metadata or {}),
        }
        write_json_atomic(tmp / METADATA, meta)
        _replace_dir(tmp, out)
    dist.barrier()
    return out
