"""Megatron-Core distributed checkpoints: atomic saves, safe resumes.

Layout of ``checkpoint.save``::

    iter_0000005/                  one complete checkpoint (dist_checkpointing files
      megabridge.json              + what megabridge needs to trust it)
    iter_0000010/
    latest_checkpointed_iteration.txt

A checkpoint is written into a hidden ``.tmp-iter_*`` sibling and renamed into
place only when every rank has finished: a crash mid-save leaves no folder that
looks complete. ``megabridge.json`` is written last; it records the model's
architecture (a resume into a different model stops with the fields that
differ) and the size and checksum of every file of the checkpoint, so a folder
that lost, truncated or damaged a file afterwards (a full disk, a bad copy, a bad
disk) is recognised before it is loaded (training/integrity.py): ``resolve`` skips
it, with a warning, for the previous complete one.

Saving never waits forever and never half-succeeds: a folder that cannot be
written (permissions, a full disk) raises CheckpointError on every rank, the
temporary folder is removed, and the previous checkpoints stay as they were.
Weights holding NaN or Inf are never written.

A converted HF model (``megabridge convert hf-to-megatron``) is a single
checkpoint folder of the same kind, at iteration 0, written through
megabridge.outputs (locked while written, never replacing what it may not).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megabridge import outputs
from megabridge.conversion.hf_io import SIDECAR_FILES
from megabridge.errors import CheckpointError, UserError
from megabridge.models.config import architecture
from megabridge.peft import lora
from megabridge.training import foreign, integrity, trust
from megabridge.training.integrity import METADATA, verify

log = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_metadata(ckpt_dir: Path, hf_config: str | Path | None = None) -> dict:
    """megabridge.json, or for a checkpoint Megatron-LM / Megatron-Bridge / NeMo 2 wrote,
    the same made from what it carries (``hf_config``: an HF config that describes it)."""
    path = Path(ckpt_dir) / METADATA
    if not path.is_file() and foreign.kind(ckpt_dir) is not None:
        return foreign.metadata(ckpt_dir, hf_config)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt_dir} is not a megabridge checkpoint (no {METADATA})"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupted: {e}") from None


def is_complete(ckpt_dir: Path) -> bool:
    return verify(ckpt_dir) is None


def _looks_like_checkpoint(path: Path) -> bool:
    markers = (METADATA, "metadata.json", ".metadata", "common.pt")
    return (
        path.name.startswith("iter_")
        or any((path / m).exists() for m in markers)
        or foreign.looks_like_checkpoint(path)
    )


def _warn(message: str, *args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:  # once, not once per rank
        log.warning(message, *args)


def _latest_named(root: Path) -> Path | None:
    """The checkpoint ``latest_checkpointed_iteration.txt`` names, if it is readable."""
    latest_file = root / LATEST
    if not latest_file.is_file():
        return None
    try:
        return root / iter_dirname(int(latest_file.read_text().strip()))
    except ValueError:
        _warn("ignoring %s: it holds no iteration number", latest_file)
        return None


def resolve(path: str | Path, content: bool = True) -> Path:
    """The checkpoint folder to load from ``path``: itself, or its latest complete one.

    A checkpoint folder named directly must be complete. In a save folder, the
    newest complete checkpoint (up to the one ``latest_checkpointed_iteration.txt``
    names) wins; newer incomplete or damaged ones are skipped with a warning.
    ``content=False`` checks the files' sizes only: the caller checks their content as it
    reads them (checksums.ReadVerifier) or with verify_content() before it loads them.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    check = integrity.verify_once if content else integrity.verify
    if _looks_like_checkpoint(root):
        problem = check(root)
        if problem:
            raise CheckpointError(f"checkpoint {root} is incomplete or damaged: {problem}")
        return _warn_unchecked(root)
    for tmp in sorted(root.glob(".tmp-iter_*")):
        _warn("ignoring %s: a save that did not finish", tmp)
    candidates = sorted(p for p in root.glob("iter_*") if p.is_dir())
    named = _latest_named(root)
    if named in candidates:
        candidates = [p for p in candidates if p <= named]
    for ckpt in reversed(candidates):
        problem = check(ckpt)
        if problem is None:
            return _warn_unchecked(ckpt)
        _warn("skipping checkpoint %s: %s", ckpt, problem)
    raise CheckpointError(f"no complete checkpoint in {root}")


def verify_content(ckpt: Path) -> None:
    """What resolve() checks with ``content``, for a folder it resolved without."""
    problem = integrity.verify_once(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or damaged: {problem}")


def _warn_unchecked(ckpt: Path) -> Path:
    if not integrity.has_checksums(ckpt):
        _warn("%s has no checksums (written before megabridge recorded them): its content "
              "is not verified", ckpt)  # fmt: skip
    return ckpt


def has_checkpoints(root: str | Path) -> bool:
    """Whether ``root`` holds any ``iter_*`` folder, complete or not."""
    return Path(root).is_dir() and any(p.is_dir() for p in Path(root).glob("iter_*"))


def check_architecture(ckpt_dir: Path, model_cfg, hf_config: str | Path | None = None) -> dict:
    """Refuse a checkpoint made for another model; returns its metadata. ``hf_config``
    describes a foreign checkpoint that carries no description (see read_metadata)."""
    meta = read_metadata(ckpt_dir, hf_config)
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


def _sharded_state_dict(
    model_chunks, optimizer=None, scheduler=None, extra=None, loading=False, prefix=""
):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.utils import unwrap_model

    (model,) = [unwrap_model(m) for m in model_chunks]
    sd = {"model": model.sharded_state_dict(prefix=prefix)}
    if _peft_of(model) is not None:  # the adapters only: the frozen base is the pretrained model's
        sd["model"] = lora.adapter_state(model, sd["model"])
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


def _in_process_results_queue() -> None:
    """Spare dist_checkpointing's results Manager on synchronous saves.

    FileSystemWriterAsync collects its writer processes' results through a
    multiprocessing Manager queue started with the 'spawn' method: a fresh
    interpreter that re-imports __main__ (seconds, and half a GB, on every first
    save). megabridge saves synchronously, so the results are produced and read
    in this process and an in-process queue serves.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


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
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``root/iter_<iteration>`` atomically; returns its path.

    ``write_extra(folder)``, called on every rank before the checkpoint is sealed,
    adds files to it (the HF copy of checkpoint.save_hf); it must fail on every
    rank or on none. Raises CheckpointError on every rank when it cannot be
    written; nothing that looks like a checkpoint is left behind then.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    root = Path(root)
    final = root / iter_dirname(iteration)
    tmp = root / f".tmp-{final.name}"
    _check_finite(model_chunks, final)
    _in_process_results_queue()  # before rank 0 may raise: every rank gets here
    _on_rank0(lambda: _fresh_dir(tmp), f"cannot write checkpoint {final}")
    state = _sharded_state_dict(
        model_chunks, optimizer, scheduler, extra={"train_state": dict(train_state)}
    )
    try:
        dist_checkpointing.save(state, str(tmp))
    except (Exception, CheckpointException) as e:  # a write failure raises on every rank
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_one_line(e)}") from e
    dist.barrier()
    if write_extra is not None:
        try:
            write_extra(tmp)
        except (UserError, OSError) as e:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {_one_line(e)}") from e
    meta = _metadata(iteration, train_state, model_cfg, extra_metadata)
    peft = _peft_of(unwrap_model(model_chunks[0]))
    if peft is not None:
        meta["peft"] = peft
    _on_rank0(lambda: _publish(tmp, final, meta, keep_last_n), f"cannot write checkpoint {final}")
    return final


def _metadata(iteration: int, train_state: dict, model_cfg, extra: dict | None) -> dict:
    return {
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
        **(extra or {}),
    }


def ensure_writable(root: str | Path) -> None:
    """Fail now, on every rank, if checkpoints cannot be written under ``root``."""
    root = Path(root)

    def probe() -> None:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / ".megabridge-write-test", "ok")
        (root / ".megabridge-write-test").unlink()

    _on_rank0(probe, f"checkpoint.save={root} is not writable")


def _fresh_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()


def _publish(tmp: Path, final: Path, meta: dict, keep_last_n: int | None) -> None:
    """Rank 0, once every rank has written its part: seal, rename, point LATEST at it, prune."""
    meta.update(integrity.file_records(tmp))
    try:
        write_json_atomic(tmp / METADATA, meta)  # last: its presence marks a finished save
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
        raise
    _replace_dir(tmp, final)
    _fsync_dir(final.parent)
    write_text_atomic(final.parent / LATEST, str(meta["iteration"]))
    if keep_last_n:
        prune(final.parent, keep_last_n, newest=final)
    for leftover in (*final.parent.glob(".tmp-iter_*"), *final.parent.glob(".trash-iter_*")):
        shutil.rmtree(leftover, ignore_errors=True)  # of interrupted saves and deletes


def _on_rank0(fn, what: str) -> None:
    """Run the filesystem step ``fn`` on rank 0; if it fails, every rank raises CheckpointError.

    The other ranks learn of the failure through a broadcast, instead of waiting
    at the next collective for a rank that has gone.
    """
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except OSError as e:
            error = f"{what}: {_one_line(e)}"
    box = [error]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])


def _check_finite(model_chunks, final: Path) -> None:
    """Refuse, on every rank, to write weights that hold NaN or Inf."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
    bad = (~finite).to(torch.float32).reshape(1)
    if dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise CheckpointError(f"refusing to write {final}: the weights hold NaN or Inf")


def _one_line(e: BaseException) -> str:
    """The root cause of ``e`` in one line: the OSError inside if there is one, else the
    innermost error (dist_checkpointing wraps what each rank's writer processes raised)."""
    todo, seen, innermost = [e], set(), e
    while todo:
        cur = todo.pop(0)
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError):
            return str(cur)
        innermost = cur
        failures = getattr(cur, "failures", None) or {}  # CheckpointException: rank -> (e, tb)
        todo += [cur.__cause__, cur.__context__, *(f[0] for f in failures.values())]
    line = (str(innermost).strip().splitlines() or [""])[0]
    if "[Errno " in line:  # an OSError that crossed a process boundary as text
        return line[line.index("[Errno ") :]
    return f"{type(innermost).__name__}: {line}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def prune(root: Path, keep_last_n: int, newest: Path) -> None:
    """Keep ``newest`` and the ``keep_last_n - 1`` complete checkpoints before it.

    Called only once ``newest`` is complete, so there is always one to resume
    from. Older ones are renamed out of sight before they are deleted: a crash
    mid-delete leaves no damaged ``iter_*`` folder. Checkpoints newer than
    ``newest`` (of a run that went back to an earlier one) are left alone.
    """
    older = sorted(p for p in root.glob("iter_*") if p.name < newest.name and is_complete(p))
    doomed = older[: max(len(older) - (keep_last_n - 1), 0)]
    for old in doomed:
        trash = root / f".trash-{old.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------ load


def load(
    ckpt_dir: Path, model_chunks, optimizer=None, scheduler=None, model_only=False,
    hf_config: str | Path | None = None,
) -> dict:  # fmt: skip
    """Load a checkpoint into the (already built) model, optimizer and scheduler.

    Returns the saved train_state ({} for model-only loads). The checkpoint may
    have been written at another TP/PP layout: dist_checkpointing reshards.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    meta = read_metadata(ckpt_dir, hf_config)
    prefix = meta.get("foreign", {}).get("key_prefix", "")  # NeMo 2's keys start with module.
    if "foreign" in meta and not model_only:  # another tool's optimizer state is not ours
        _warn("%s was written by %s: loading its weights only", ckpt_dir, meta["foreign"]["kind"])
        model_only = True
    (model,) = [unwrap_model(m) for m in model_chunks]
    peft = _peft_of(model)
    if peft is not None or "peft" in meta:
        lora.check_checkpoint(meta.get("peft"), peft, ckpt_dir, resuming=not model_only)
    if model_only:
        sd = _sharded_state_dict(model_chunks, prefix=prefix)
    else:
        sd = _sharded_state_dict(
            model_chunks, optimizer, scheduler, extra={"train_state": {}}, loading=True
        )
        same_layout = meta.get("layout") == _layout_dict()
        if not same_layout:  # RNG streams are per (pp, tp) rank: only meaningful at the same layout
            sd.pop("rng_state")
    ckpt_dir = foreign.dist_dir(ckpt_dir)  # NeMo 2: its weights/ folder
    trust.check_pickles(ckpt_dir)  # before Megatron-Core or torch unpickle anything of it
    try:
        with trust.common_state_globals():  # Megatron-LM's args in common.pt
            state = dist_checkpointing.load(sd, str(ckpt_dir))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir}: {_one_line(e)}") from e
    if prefix:
        state["model"] = {k.removeprefix(prefix): v for k, v in state["model"].items()}
    if peft is not None:
        lora.load_adapter_state(model, state["model"], ckpt_dir)
    else:
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


def _peft_of(model) -> dict | None:
    """The adapter settings of a model with LoRA/DoRA adapters (peft/lora.py), else None."""
    return getattr(model, "megabridge_peft", None)


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
    write: Callable[[Path], None] | None = None,
    inputs: list | None = None,
) -> Path:
    """A model-only checkpoint folder at ``out`` (iteration 0), written atomically.

    ``assets``: a folder whose HF sidecar files (tokenizer, generation config) are
    kept in ``out/hf_assets`` so the checkpoint can become an HF folder again.
    ``write(folder)``: writes the Megatron-Core checkpoint itself instead of
    saving ``model_chunks`` (e.g. streamed from an HF folder, with no model built).
    ``inputs``: folders ``out`` may not overlap. Rank 0 locks ``out`` while it is written
    (megabridge.outputs): a concurrent writer of the same path fails with one line.
    """
    from megatron.core import dist_checkpointing

    folder = outputs.OutputFolder(out, overwrite, inputs)
    box: list = [None, None]  # rank 0's verdict: (problem, staging folder)
    if dist.get_rank() == 0:
        try:
            box[1] = str(folder.claim())
        except UserError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)  # every rank learns rank 0's verdict
    if box[0]:
        raise UserError(box[0])
    tmp = Path(box[1])
    rank0 = dist.get_rank() == 0
    try:
        if write is not None:
            write(tmp)
        else:
            _in_process_results_queue()
            dist_checkpointing.save(_sharded_state_dict(model_chunks), str(tmp))
        dist.barrier()
        if rank0:
            _seal_model(tmp, model_cfg, extra_metadata, assets)
            folder.publish()
    except BaseException:
        if rank0:  # nothing half-written stays behind
            folder.abandon()
        raise
    dist.barrier()
    return Path(out)


def _seal_model(tmp: Path, model_cfg, extra_metadata: dict | None, assets: Path | None) -> None:
    """Rank 0: the HF sidecar files, then megabridge.json (sizes and checksums) last."""
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
        **integrity.file_records(tmp),
    }
    write_json_atomic(tmp / METADATA, meta)
