"""Loading a checkpoint never runs code from it: its pickles are vetted before anything reads them.

A Megatron-Core torch_dist checkpoint holds three kinds of pickle:

* ``.metadata``: torch.distributed.checkpoint's Metadata, which torch's FileSystemReader
  reads with plain ``pickle.load`` (torch/distributed/checkpoint/filesystem.py);
* the byte items inside the ``*.distcp`` files (Megatron's ShardedObjects: the RNG state,
  layers' ``_extra_state``), which torch's DefaultLoadPlanner.load_bytes reads with
  ``torch.load(weights_only=False)``;
* ``common.pt`` (and any ``*.pt`` beside it): the non-sharded state, read by
  Megatron-Core with ``torch.load``'s default (weights_only since torch 2.6).

The first two import and call whatever the pickle names, so a crafted checkpoint runs
code on ``convert megatron-to-hf``, ``export``, ``verify`` or a resume. check_pickles()
unpickles every one of them first with unpicklers that import only an allow-list (torch's
weights_only unpickler, plus the few classes these files hold) and refuses the checkpoint
in one line otherwise. The real load then reads the same, vetted, bytes.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner

from megabridge.errors import CheckpointError

_DCP_MODULES = (dcp_metadata, dcp_planner)
_EXACT = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # StorageMeta.checkpoint_id, when torch's writer was given a path
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
}


def _allowed_metadata_global(module: str, name: str):
    """The object a ``.metadata`` pickle may name, or None: torch's checkpoint-metadata
    dataclasses and enums, torch dtypes / layouts / memory formats and torch.Size."""
    if (module, name) in _EXACT:
        return _EXACT[(module, name)]
    for dcp in _DCP_MODULES:
        if module == dcp.__name__:
            obj = getattr(dcp, name, None)
            is_data = isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            )
            return obj if is_data else None
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
            return obj
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _allowed_metadata_global(module, name)
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


class _Refused(Exception):
    pass


# What the byte items hold besides tensors and plain Python values: NumPy's RNG state
# (an ndarray of uint32; torch's weights_only unpickler has no NumPy by default).
_NUMPY_GLOBALS = [
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    type(np.dtype(np.int64)),
    type(np.dtype(np.float64)),
    np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct,
]


def _megatron_lm_globals() -> list:
    """What Megatron-LM's common state adds: its run arguments (an argparse Namespace that
    holds Megatron-Core enums, e.g. attention_backend)."""
    from megatron.core.transformer import enums

    return [argparse.Namespace, *(v for v in vars(enums).values() if _is_enum(v))]


def common_state_globals():
    """A context in which torch.load (Megatron-Core's load of common.pt) accepts what
    check_pickles accepted there: Megatron-LM's run arguments."""
    return torch.serialization.safe_globals([*_NUMPY_GLOBALS, *_megatron_lm_globals()])


def _is_enum(value) -> bool:
    return isinstance(value, type) and issubclass(value, enum.Enum)


def _weights_only(data: bytes, what: str):
    with torch.serialization.safe_globals([*_NUMPY_GLOBALS, *_megatron_lm_globals()]):
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refusing to load {what}: {_why(e)}") from None


def load_common_state(ckpt_dir: Path):
    """The checkpoint's common (non-sharded) state, unpickled with the allow-list: common.pt,
    or, as newer Megatron-Core stores it, the ``common_state`` byte item; None without either."""
    root = Path(ckpt_dir)
    if (root / "common.pt").is_file():
        return _weights_only((root / "common.pt").read_bytes(), str(root / "common.pt"))
    metadata = read_metadata(root)
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn == "common_state":
            path = (root / info.relative_path).resolve()
            if not path.is_relative_to(root.resolve()):
                raise CheckpointError(f"refusing to load {root}: .metadata names {path}")
            with open(path, "rb") as f:
                f.seek(info.offset)
                state = _weights_only(f.read(info.length), f"{path.name} (common_state)")
            return state[0] if isinstance(state, list) and len(state) == 1 else state
    return None


def _why(e: Exception) -> str:
    """The useful clause of torch's weights_only refusal (its message is a page long)."""
    for line in str(e).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            detail = line.split("WeightsUnpickler error:")[-1].strip()
            return f"its pickle is not plain data ({detail.split(' was not')[0]})"
    return "its pickle is not plain data"


def read_metadata(ckpt_dir: Path) -> dcp_metadata.Metadata:
    """The checkpoint's ``.metadata``, unpickled with the allow-list."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(
            f"refusing to load {path}: its pickle names {e}, which checkpoint metadata never "
            "holds (a crafted file could run code)"
        ) from None
    except Exception as e:  # noqa: BLE001 - garbage bytes fail in many ways, none of them ours
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def check_pickles(ckpt_dir: Path) -> None:
    """Unpickle every pickle of a torch_dist checkpoint safely; CheckpointError if one is not
    plain data. Paths named inside .metadata must stay in the folder."""
    root = Path(ckpt_dir).resolve()
    metadata = read_metadata(root)
    byte_items = {
        fqn
        for fqn, item in metadata.state_dict_metadata.items()
        if isinstance(item, dcp_metadata.BytesStorageMetadata)
    }
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_items:
            continue
        path = (root / info.relative_path).resolve()
        if not path.is_relative_to(root):
            raise CheckpointError(f"refusing to load {root}: .metadata names {info.relative_path}")
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        _weights_only(data, f"{path.name} ({index.fqn})")
    for path in sorted(root.rglob("*.pt")):
        _weights_only(path.read_bytes(), str(path))
