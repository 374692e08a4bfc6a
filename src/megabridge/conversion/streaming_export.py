"""Megatron distributed checkpoint -> HF folder, one parameter at a time, no model in memory.

The inverse of streaming.py. The model is built on the meta device at TP=1, PP=1:
its sharded state dict says under which checkpoint key, and at which offset (the
layer, the expert), each whole parameter is stored; the gated MLP's fused input
projection appears as two halves, views of the parameter. Each parameter is read
alone: an empty tensor of its shape and of the checkpoint's dtype is filled in place
by torch.distributed.checkpoint (which reads only the chunks that overlap it, at
whatever TP/PP/EP layout they were saved; dcp_reader reads each straight into it), mapped to
its HF tensors by the family's mappings and written into its safetensors file.

The HF tensors' names, shapes and dtypes are known before any weight is read (the
mappings run on meta tensors), so every safetensors file is laid out up front and
each tensor is written at its offset as soon as it exists: peak memory is about
the largest parameter, not the model, whatever the shard size. An HF tensor that
stacks every expert of a layer (GPT-OSS) is written one expert's block at a time.

The caller vets the checkpoint's pickles (training/trust.py) before this reads it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    apply_factories,
    is_main_replica,
)
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megabridge.conversion import dcp_reader, hf_io, transfer
from megabridge.conversion.streaming import NotStreamable
from megabridge.errors import ConversionError

_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# safetensors' names of torch dtypes (the inverse of hf_io's table)
_ST_DTYPES = {v: k for k, v in hf_io._DTYPES.items()}


@dataclasses.dataclass
class _Param:
    name: str  # global Megatron name
    shape: tuple[int, ...]
    pieces: list[tuple[ShardedTensor, tuple]]  # (sharded entry, view of the parameter it is)


class ExportPlan:
    """Where every HF tensor of the export comes from, and where it goes."""

    def __init__(
        self, family, cfg, model, ckpt_dir: Path, prefix: str, vocab: int, dtype_of, verifier
    ):  # fmt: skip
        self.family, self.cfg, self.ckpt_dir = family, cfg, Path(ckpt_dir)
        self.vocab, self.dtype_of = vocab, dtype_of
        self.reader = dcp_reader.ChunkReader(str(ckpt_dir), verifier)
        metadata = self.reader.read_metadata()
        stored = metadata.state_dict_metadata
        self.stored = stored
        self.params = _params(model, cfg, prefix)
        self.stored_dtype = {}
        for p in self.params:
            key = p.pieces[0][0].key
            if key not in stored:
                raise ConversionError(f"{ckpt_dir} has no tensor {key} (for {p.name})")
            self.stored_dtype[p.name] = stored[key].properties.dtype
        # read in the order the bytes lie in the files: the verifier then hashes them from
        # memory as they arrive (the output files are laid out up front: any order fills them)
        self.read_order = sorted(self.params, key=_first_byte(metadata))
        self.outputs = {}  # hf name -> (shape, dtype), in export order
        for p in self.params:
            full = torch.empty(p.shape, dtype=self.stored_dtype[p.name], device="meta")
            for hf_name, t, expert in self._hf_tensors(p.name, full):
                shape = tuple(t.shape)
                if expert is not None:  # one expert's block of a tensor stacking them all
                    shape = (cfg.num_moe_experts, *shape)
                self.outputs[hf_name] = (shape, t.dtype)

    def _hf_tensors(self, name: str, full: torch.Tensor):
        if name in _VOCAB_PARAMS:
            full = full[: self.vocab]  # TP's (or Megatron-LM's) padding rows are not HF's
        mapping, hf_names = self.family.resolve(name)
        expert = mapping.expert_of(name)  # None, or its index in HF tensors stacking experts
        for hf_name, tensor in zip(hf_names, mapping.megatron_to_hf(full, self.cfg), strict=True):
            dtype = self.dtype_of(hf_name) if self.dtype_of else None
            yield hf_name, tensor.to(dtype) if dtype is not None else tensor, expert

    def write(
        self, out: Path, file_of: dict[str, str] | None, max_shard_bytes: int, progress,
        allow_non_finite: bool = False,
    ):  # fmt: skip
        """Fill the (empty) folder ``out`` with the safetensors files and their index."""
        files = _assign_files(self.outputs, file_of, max_shard_bytes)
        file_of_name = {n: f for f, names in files.items() for n in names}
        writers = {f: _SafetensorsFile(out / f, names, self.outputs) for f, names in files.items()}
        try:
            for p in progress(self.read_order):
                for hf_name, tensor, expert in self._hf_tensors(p.name, self._read(p)):
                    # the writer needs it contiguous anyway, and aminmax runs 5x faster so
                    # (q/k/v are strided views of the fused projection)
                    tensor = tensor.contiguous()
                    if not allow_non_finite:  # as hf_io's writer: NaN / Inf only on request
                        hf_io.check_finite(tensor, f"exported tensor {hf_name!r}")
                    writers[file_of_name[hf_name]].write(hf_name, tensor, expert)
        finally:
            for writer in writers.values():
                writer.file.close()
        for writer in writers.values():
            writer.close()
        if set(files) != {hf_io.SINGLE}:
            index = {
                "metadata": {"total_size": sum(_nbytes(*v) for v in self.outputs.values())},
                "weight_map": dict(sorted(file_of_name.items())),
            }
            (out / hf_io.INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _read(self, p: _Param) -> torch.Tensor:
        """The whole parameter ``p``, read from the checkpoint into fresh memory."""
        full = torch.empty(p.shape, dtype=self.stored_dtype[p.name])
        regions = []
        for item, view in p.pieces:
            # the chunk as stored: Megatron's prepended axes (layer, expert) are dimensions of 1
            sizes = (1,) * item.prepend_axis_num + tuple(item.local_shape)
            regions.append(
                (item.key, tuple(item.global_offset), full.as_strided(*view).view(sizes))
            )
        with warnings.catch_warnings():  # torch.distributed.checkpoint's one-process notes
            warnings.simplefilter("ignore", UserWarning)
            try:
                dcp_load(
                    {}, storage_reader=self.reader, planner=_RegionPlanner(regions), no_dist=True
                )
            except CheckpointException as e:  # torch wraps what the reader raised: unwrap ours
                ours = [exc for exc, _ in e.failures.values() if isinstance(exc, ConversionError)]
                if ours:
                    raise ours[0] from None
                raise
        return full


class _RegionPlanner(LoadPlanner):
    """Reads given regions (key, global offset, destination tensor) of stored tensors into
    their destinations, from whichever stored chunks overlap them."""

    def __init__(self, regions: list[tuple[str, tuple, torch.Tensor]]):
        self.regions = {(key, offset): dest for key, offset, dest in regions}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offset), dest in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=dest.shape)
            stored = self.metadata.state_dict_metadata[key]
            items += create_read_items_for_chunk_list(key, stored, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise ConversionError(f"unexpected byte item {read_item.dest_index.fqn} in a tensor read")

    def resolve_bytes(self, read_item):
        raise ConversionError(f"unexpected byte item {read_item.dest_index.fqn} in a tensor read")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # read in place into the destination


def plan(
    family, cfg, model, ckpt_dir: Path, prefix="", vocab=None, dtype_of=None, verifier=None
) -> ExportPlan:
    """``model``: ``cfg``'s model built on the meta device at TP=1, PP=1; ``verifier``: a
    checksums.ReadVerifier shown every byte range the export reads."""
    return ExportPlan(
        family, cfg, model, ckpt_dir, prefix, vocab or cfg.vocab_size, dtype_of, verifier
    )


def _first_byte(metadata) -> Callable[[_Param], tuple]:
    """Sort key of a parameter: (file, offset) of the first stored chunk it reads."""
    where: dict[str, list] = {}  # key -> [(chunk offsets, chunk sizes, (file, offset))]
    for index, info in (metadata.storage_data or {}).items():
        chunk = (tuple(index.offset or ()), (info.relative_path, info.offset))
        where.setdefault(index.fqn, []).append(chunk)
    sizes = {}
    for key, stored in metadata.state_dict_metadata.items():
        for chunk in getattr(stored, "chunks", ()):
            sizes[(key, tuple(chunk.offsets))] = tuple(chunk.sizes)

    def overlaps(key, chunk_offsets, item) -> bool:
        chunk_sizes = sizes.get((key, chunk_offsets), ())
        lengths = (1,) * item.prepend_axis_num + tuple(item.local_shape)
        region = (tuple(item.global_offset), lengths, chunk_offsets, chunk_sizes)
        if len(set(map(len, region))) != 1:
            return False
        return all(o < go + n and go < o + s for go, n, o, s in zip(*region, strict=True))

    def key(p: _Param) -> tuple:
        places = [
            place
            for item, _ in p.pieces
            for offsets, place in where.get(item.key, ())
            if overlaps(item.key, offsets, item)
        ]
        return min(places, default=("", 0))

    return key


def _params(model, cfg, prefix: str) -> list[_Param]:
    """Every parameter of the model with the checkpoint entries that hold it."""
    sharded = model.sharded_state_dict(prefix=prefix)
    apply_factories(sharded)
    params = {
        id(t): (name, t)
        for _, _, name, t in transfer.local_params([model], cfg)
        if not transfer._tied_output(name, cfg)
    }
    pieces: dict[str, list] = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedObject) or not is_main_replica(item.replica_id):
            continue
        if not isinstance(item, ShardedTensor) or item.flattened_range is not None:
            raise NotStreamable(f"unexpected checkpoint entry {item!r}")
        base = item.data if item.data._base is None else item.data._base
        if id(base) not in params:
            if item.key.endswith("output_layer.weight"):
                continue  # the tied output layer's copy of the embedding
            raise NotStreamable(f"{item.key} is not a view of one parameter")
        view = (tuple(item.data.shape), item.data.stride(), item.data.storage_offset())
        pieces.setdefault(params[id(base)][0], []).append((item, view))
    missing = [name for name, _ in params.values() if name not in pieces]
    if missing:
        raise NotStreamable(f"no checkpoint entry for {', '.join(missing[:4])}")
    return [_Param(name, tuple(t.shape), pieces[name]) for name, t in params.values()]


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _assign_files(outputs: dict, file_of: dict | None, max_shard_bytes: int) -> dict:
    """file -> its tensor names: the reference layout's, else filled greedily in order."""
    if file_of is not None:
        unknown = [n for n in outputs if n not in file_of]
        if unknown:
            raise ConversionError(f"tensor {unknown[0]!r} has no shard in the reference layout")
        files: dict[str, list[str]] = {}
        for name in outputs:
            files.setdefault(file_of[name], []).append(name)
        return files
    groups, size = [[]], 0
    for name, (shape, dtype) in outputs.items():
        n = _nbytes(shape, dtype)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    if len(groups) == 1:
        return {hf_io.SINGLE: groups[0]}
    total = len(groups)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": g for i, g in enumerate(groups)}


class _SafetensorsFile:
    """A safetensors file laid out from known names, shapes and dtypes, filled in any order."""

    def __init__(self, path: Path, names: list[str], outputs: dict):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.slots = {}
        for name in names:
            shape, dtype = outputs[name]
            n = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self.slots[name] = (offset, n, shape, dtype)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        self.start = 8 + len(raw)
        self.path, self.left = path, set(names)
        self.blocks_left: dict[str, set[int]] = {}  # a stacked tensor's blocks not yet written
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close(), written across calls
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file.truncate(self.start + offset)

    def write(self, name: str, tensor: torch.Tensor, block: int | None = None) -> None:
        """``tensor`` as the tensor ``name``, or with ``block`` as its block ``block`` along
        dim 0 (one expert of a tensor that stacks every expert: contiguous in the file)."""
        offset, n, shape, dtype = self.slots[name]
        if block is not None:
            left = self.blocks_left.setdefault(name, set(range(shape[0])))
            if block not in left:
                raise ConversionError(f"tensor {name!r} block {block} was produced twice")
            shape, n = shape[1:], n // shape[0]
            offset += block * n
        elif name not in self.left:
            raise ConversionError(f"tensor {name!r} was produced twice")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self.file.seek(self.start + offset)
        self.file.write(memoryview(data))
        if block is not None:
            left.discard(block)
            if left:
                return
        self.left.discard(name)

    def close(self) -> None:
        self.file.close()
        if self.left:
            raise ConversionError(f"export is missing tensors: {', '.join(sorted(self.left)[:10])}")


def write_hf_folder(
    export: ExportPlan,
    out: Path,
    config_dict: dict,
    source: Path | None,
    file_of: dict | None,
    progress: Callable = iter,
    max_shard_bytes: int = 5 * 10**9,
    allow_non_finite: bool = False,
) -> None:
    """Fill ``out`` (an empty folder) like hf_io.write_hf_folder, streaming the weights."""
    export.write(out, file_of, max_shard_bytes, progress, allow_non_finite)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if source is not None:
        for name in hf_io.SIDECAR_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, out / name)
