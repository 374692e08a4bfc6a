"""HF folder -> Megatron distributed checkpoint without materialising the model.

The model is built on the meta device: its sharded state dict then says which
tensors the checkpoint holds, their global shapes and the chunks Megatron-Core
would write (at TP=1, PP=1: the checkpoint is layout-independent and loads at
any TP/PP). Megatron-Core's own ``dist_checkpointing.save`` writes the common
part and the format metadata; the sharded part goes through
``torch.distributed.checkpoint`` with a planner whose tensors are produced only
when the writer asks for them: read the HF tensors of one parameter, fuse them
the Megatron way, write, forget. One file per chunk keeps the writer from
holding a file's tensors until it closes, so peak memory stays near the largest
few tensors rather than the model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    apply_factories,
    is_main_replica,
)
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from megabridge.conversion import transfer
from megabridge.progress import Progress

_WRITE_THREADS = 4


class NotStreamable(Exception):
    """This model's checkpoint layout cannot be produced tensor by tensor (use the in-memory path)."""


class Plan:
    """What the checkpoint of ``bridge``'s HF folder holds, traced back to the HF tensors."""

    def __init__(self, bridge, cfg, sharded: dict, params: dict, sources: dict):
        self.bridge, self.cfg = bridge, cfg
        self.sharded, self.sources = sharded, sources
        self.metas = dict(params.values())  # name -> meta tensor

    def write(self, checkpoint_dir: Path, progress: bool = True) -> None:
        """Write the Megatron-Core checkpoint into the (empty) folder ``checkpoint_dir``."""
        errors: list[BaseException] = []

        def build(name: str) -> torch.Tensor:
            meta = self.metas[name]
            full, _ = transfer.full_tensor(
                self.bridge.family, self.bridge.source, name, tuple(meta.shape), self.cfg
            )
            full = full.to(meta.dtype).contiguous()
            # The writer takes views by absolute storage offset: a view into a bigger tensor
            # (an expert's slice of a stacked HF tensor) must start its own storage.
            return full.clone() if full.storage_offset() else full

        tensors = _Tensors(build, Counter(name for name, _ in self.sources.values()))
        total = len(self.sources)
        with Progress("hf-to-megatron", total=total, enabled=progress) as bar:

            def produce(key) -> torch.Tensor:
                if errors:  # the conversion has failed: the other writers stop at their next tensor
                    raise RuntimeError("stopped: another tensor failed")
                name, (shape, stride, offset) = self.sources[key]
                try:
                    out = tensors.view(name, shape, stride, offset)
                except BaseException as e:
                    errors.append(e)
                    raise
                bar.update(nbytes=out.numel() * out.element_size())
                return out

            with _writer_threads() as thread_errors:
                try:
                    dist_checkpointing.save(
                        {"model": self.sharded},
                        str(checkpoint_dir),
                        sharded_strategy=_LazySaveStrategy(produce),
                    )
                except BaseException:  # torch's CheckpointException is a BaseException
                    if errors:  # the first problem as raised, not as the writer wrapped it
                        raise errors[0] from None
                    raise
                finally:
                    transfer.forget_recent_reads()
            if errors or thread_errors:  # a writer thread's failure leaves its files unwritten
                raise (errors or thread_errors)[0]


@contextlib.contextmanager
def _writer_threads():
    """Torch's checkpoint writer threads, held until every one has finished.

    torch.distributed.checkpoint lets a writer thread die with its exception (the
    rest of the checkpoint is still written), and when its calling thread fails it
    returns without waiting for the others, which go on writing into the folder the
    caller then deletes. Here their exceptions are collected instead of printed (the
    caller raises the first one) and each thread started inside is joined on the way out.
    """
    caught: list[BaseException] = []
    started: list[threading.Thread] = []
    previous_hook, start = threading.excepthook, threading.Thread.start

    def start_and_keep(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    threading.excepthook = lambda args: caught.append(args.exc_value)
    threading.Thread.start = start_and_keep
    try:
        yield caught
    finally:
        threading.Thread.start = start
        for thread in started:
            thread.join()
        threading.excepthook = previous_hook


def plan(bridge, cfg, model) -> Plan:
    """Trace every tensor of the checkpoint to its HF sources.

    ``model``: the model of ``cfg`` built on the meta device (shapes only, no memory).
    Raises NotStreamable when some tensor is not a plain view of one parameter.
    """
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    params = {id(t): (name, t) for _, _, name, t in transfer.local_params([model], cfg)}
    names = [name for name, _ in params.values()]
    transfer.check_sources(bridge.family, bridge.source, names, cfg)
    used = {n for name in names for n in transfer.hf_source_names(bridge.family, name, cfg)[1]}
    transfer.check_all_consumed(used, bridge.family, bridge.source, cfg)
    return Plan(bridge, cfg, sharded, params, _trace(sharded, params))


def _trace(sharded: dict, params: dict[int, tuple]) -> dict[tuple, tuple[str, tuple]]:
    """(sharded key, global offset) -> (parameter name, view of the parameter it is).

    The view is (shape, stride, storage offset) within the parameter: Megatron's
    sharded tensors are the parameters themselves or views of them (the gated
    MLP's halves), which a meta tensor records exactly.
    """
    sources = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedObject) or not is_main_replica(item.replica_id):
            continue
        if not isinstance(item, ShardedTensor) or item.flattened_range is not None:
            raise NotStreamable(f"unexpected checkpoint entry {item!r}")
        base = item.data if item.data._base is None else item.data._base
        if id(base) not in params or not base.is_contiguous():
            raise NotStreamable(f"{item.key} is not a view of one parameter")
        view = (tuple(item.data.shape), item.data.stride(), item.data.storage_offset())
        sources[(item.key, tuple(item.global_offset))] = (params[id(base)][0], view)
    return sources


class _Tensors:
    """Whole Megatron tensors, each built once and dropped after its last chunk is written.

    Writer threads may ask for two chunks of one tensor at once: the first builds
    it, the second waits for it.
    """

    def __init__(self, build: Callable, uses: Counter):
        self._build, self._left = build, dict(uses)
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}  # name -> [lock, tensor]

    def view(self, name: str, shape, stride, offset) -> torch.Tensor:
        with self._lock:
            entry = self._entries.setdefault(name, [threading.Lock(), None])
        with entry[0]:
            if entry[1] is None:
                entry[1] = self._build(name)
            full = entry[1]
        with self._lock:
            self._left[name] -= 1
            if self._left[name] == 0:
                del self._entries[name]
        return full.as_strided(shape, stride, offset)


class _LazySaveStrategy(SaveShardedStrategy):
    """Megatron-Core's torch_dist format, with every tensor produced when it is written."""

    def __init__(self, produce: Callable[[tuple], torch.Tensor]):
        super().__init__("torch_dist", 1)
        self.produce = produce

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        items, resolvers = [], {}
        for entry in nested_values(sharded_state_dict):
            if isinstance(entry, ShardedObject):  # stored as Megatron-Core does: a list of its data
                index = MetadataIndex(entry.unique_key)
                items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
                resolvers[index] = functools.partial(_serialised, [entry.data])
            elif isinstance(entry, ShardedTensor) and is_main_replica(entry.replica_id):
                index, item = _write_item(entry)
                items.append(item)
                key, sizes = (entry.key, tuple(entry.global_offset)), item.tensor_data.chunk.sizes
                resolvers[index] = functools.partial(self._chunk, key, sizes)
        writer = dcp.FileSystemWriter(
            checkpoint_dir,
            single_file_per_rank=False,  # a file's tensors are all held until it is closed
            thread_count=min(_WRITE_THREADS, os.cpu_count() or 1),
            # Like torch.save, no fsync per file (it doubles the time on a fast disk): the
            # folder only gets its final name once complete, so a killed conversion leaves
            # nothing behind either way.
            sync_files=False,
        )
        with (
            warnings.catch_warnings()
        ):  # "torch.distributed is disabled ...": one writer, on purpose
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                {}, storage_writer=writer, planner=_LazyPlanner(items, resolvers), no_dist=True
            )

    def _chunk(self, key: tuple, sizes: torch.Size) -> torch.Tensor:
        return self.produce(key).reshape(sizes)


def _write_item(entry: ShardedTensor) -> tuple[MetadataIndex, WriteItem]:
    """The chunk of the global tensor ``entry`` is, as torch.distributed.checkpoint describes it
    (Megatron's prepended axes, e.g. the layer number, are leading dimensions of size 1)."""
    offsets = torch.Size(entry.global_offset)
    sizes = torch.Size((1,) * entry.prepend_axis_num + tuple(entry.local_shape))
    index = MetadataIndex(entry.key, offsets)
    data = TensorWriteData(
        chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
        properties=TensorProperties(dtype=entry.dtype),
        size=torch.Size(entry.global_shape),
    )
    return index, WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data)


def _serialised(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


class _LazyPlanner(SavePlanner):
    """A fixed list of write items; each item's data comes from its resolver when written."""

    def __init__(self, items: list[WriteItem], resolvers: dict):
        self.items, self.resolvers = items, resolvers

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item):
        return self.resolvers[write_item.index]()
