"""Tensor chunks of a torch_dist checkpoint, read straight into the tensors that want them.

torch's FileSystemReader (torch 2.15, filesystem.py ``read_data``) ``torch.load``s each
stored chunk it needs into fresh memory and then copies the wanted region into the
destination: every byte is copied twice after the read (2.4 s of the streamed export of
a 2 GiB model). Each tensor chunk in a ``.distcp`` file is a ``torch.save`` archive at the
(offset, length) the checkpoint's storage index gives: an uncompressed zip whose
``data.pkl`` says which storage (its dtype and element count), the tensor's storage
offset, size and stride, and whose ``data/<key>`` record holds the storage's raw bytes
in the byte order its ``byteorder`` record names (torch's serialization notes,
"Serialized file format for torch.save").

ChunkReader reads that zip's directory and ``data.pkl`` (with an unpickler that imports
nothing: it only records the rebuild call torch.save's pickle makes), checks the chunk's
dtype, size, stride and bounds against the record and the destination, and reads the bytes
with ``readinto``: into the destination itself when the region is one contiguous run on
both sides, else into one buffer of the chunk, copied from there. A chunk in any other
form (a storage transform such as compression, a big-endian archive, any other pickle)
goes through torch's own reader, unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import sys
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
from torch.futures import Future

from megabridge.errors import ConversionError

_LOCAL_HEADER = b"PK\x03\x04"  # a zip local file header: 30 bytes, then name and extra field


class ChunkReader(FileSystemReader):
    """torch's FileSystemReader, reading tensor chunks in place; ``.metadata`` read once.

    ``verifier`` (a checksums.ReadVerifier) is shown every range of raw bytes read in place,
    so that the files' checksums are computed from memory instead of a second read."""

    def __init__(self, path, verifier=None):
        super().__init__(path)
        self.verifier = verifier

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata

    def read_data(self, plan: LoadPlan, planner) -> Future:
        root = Path(self.path).resolve()
        by_file: dict[str, list] = {}
        elsewhere = []  # torch's reader reads these
        for item in plan.items:
            stored = self.storage_data[item.storage_index]
            if item.type != LoadItemType.TENSOR or stored.transform_descriptors:
                elsewhere.append(item)
            else:
                by_file.setdefault(stored.relative_path, []).append(item)
        for relative, items in by_file.items():
            path = (root / relative).resolve()
            if not path.is_relative_to(root):
                raise ConversionError(f"{root}/.metadata names a file outside it: {relative}")
            with open(path, "rb", buffering=0) as f:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    if not self._read_in_place(f, item, planner):
                        elsewhere.append(item)
        if elsewhere:
            super().read_data(LoadPlan(elsewhere), planner).wait()
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_in_place(self, f, item, planner) -> bool:
        """Fill ``item``'s destination from its chunk; False when the chunk is not a plain
        little-endian torch.save archive (torch's reader then reads it)."""
        stored = self.storage_data[item.storage_index]
        chunk = _chunk(f, stored.offset, stored.length)
        if chunk is None:
            return False
        dest = planner.resolve_tensor(item).detach()
        what = f"{item.storage_index.fqn} at {tuple(item.storage_index.offset or ())}"
        chunk.check(what, dest, tuple(item.storage_offsets), tuple(item.lengths))
        start = chunk.storage_offset + sum(
            o * s for o, s in zip(item.storage_offsets, chunk.stride, strict=True)
        )
        if dest.is_contiguous() and chunk.is_run(tuple(item.storage_offsets), tuple(item.lengths)):
            self._read(f, chunk.data_start + start * dest.itemsize, _bytes_of(dest))
        else:
            whole = torch.empty(chunk.numel, dtype=chunk.dtype)
            self._read(f, chunk.data_start, _bytes_of(whole))
            region = whole.as_strided(chunk.size, chunk.stride, chunk.storage_offset)
            for dim, (offset, length) in enumerate(
                zip(item.storage_offsets, item.lengths, strict=True)
            ):
                region = region.narrow(dim, offset, length)
            dest.copy_(region)
        planner.commit_tensor(item, dest)
        return True

    def _read(self, f, position: int, into: memoryview) -> None:
        _read_exact(f, position, into)
        if self.verifier is not None:  # hashed now, before anything changes the destination
            self.verifier.read(Path(f.name), position, into)


@dataclasses.dataclass
class _Chunk:
    """One stored tensor: its storage's bytes start at ``data_start`` in the file."""

    dtype: torch.dtype
    numel: int  # the storage's elements
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    data_start: int

    def check(self, what: str, dest: torch.Tensor, offsets: tuple, lengths: tuple) -> None:
        if self.dtype != dest.dtype:
            raise ConversionError(f"{what}: chunk stored as {self.dtype}, expected {dest.dtype}")
        if tuple(dest.shape) != lengths or len(offsets) != len(self.size):
            raise ConversionError(f"{what}: region {lengths} does not fit {tuple(dest.shape)}")
        if len(self.stride) != len(self.size) or min(self.stride, default=0) < 0:
            raise ConversionError(f"{what}: malformed chunk stride {self.stride}")
        bounds = zip(offsets, lengths, self.size, strict=True)
        if any(o < 0 or n < 0 or o + n > s for o, n, s in bounds):
            raise ConversionError(f"{what}: region {offsets} + {lengths} outside {self.size}")
        last = self.storage_offset + sum(
            (n - 1) * s for n, s in zip(self.size, self.stride, strict=True)
        )
        if self.storage_offset < 0 or (math.prod(self.size) and last >= self.numel):
            raise ConversionError(f"{what}: chunk {self.size} overruns its storage")

    def is_run(self, offsets: tuple, lengths: tuple) -> bool:
        """Whether the region is one contiguous run of the (row-major) chunk."""
        expected = 1
        for size, stride in zip(reversed(self.size), reversed(self.stride), strict=True):
            if size > 1 and stride != expected:
                return False
            expected *= size
        partial = [d for d, (n, s) in enumerate(zip(lengths, self.size, strict=True)) if n != s]
        # full trailing dims, one partial dim, and single rows of the dims before it
        return not partial or all(lengths[d] == 1 for d in range(partial[-1]))


def _chunk(f, start: int, length: int) -> _Chunk | None:
    """The stored tensor described by the torch.save archive at ``start``; None when the
    archive is not the plain form this reader knows."""
    window = _Window(f, start, length)
    try:
        with zipfile.ZipFile(window) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl")]
            if len(pickles) != 1:
                return None
            prefix = pickles[0].removesuffix("data.pkl")
            if sys.byteorder != "little" or archive.read(f"{prefix}byteorder") != b"little":
                return None
            rebuilt = _RecordingUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
            if not isinstance(rebuilt, _Rebuilt):
                return None
            record = archive.getinfo(f"{prefix}data/{rebuilt.storage.key}")
    except (zipfile.BadZipFile, KeyError, _NotPlain, pickle.UnpicklingError, ValueError):
        return None
    nbytes = rebuilt.storage.numel * rebuilt.storage.dtype.itemsize
    if record.compress_type != zipfile.ZIP_STORED or record.file_size != nbytes:
        return None
    window.seek(record.header_offset)
    header = window.read(30)
    if len(header) != 30 or header[:4] != _LOCAL_HEADER:
        return None
    skip = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    data_start = start + record.header_offset + 30 + skip
    if data_start - start + nbytes > length:
        return None
    return _Chunk(
        rebuilt.storage.dtype,
        rebuilt.storage.numel,
        rebuilt.storage_offset,
        rebuilt.size,
        rebuilt.stride,
        data_start,
    )


class _NotPlain(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _Rebuilt:
    storage: _Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, *rest):
    """Stands in for torch._utils._rebuild_tensor_v2: records the call, builds nothing."""
    plain = isinstance(storage, _Storage) and not hooks and all(m in (None, {}) for m in rest)
    ints = [storage_offset, *size, *stride]
    if not plain or not all(isinstance(i, int) for i in ints):
        raise _NotPlain("not a plain tensor")
    return _Rebuilt(storage, storage_offset, tuple(size), tuple(stride))


class _RecordingUnpickler(pickle.Unpickler):
    """Reads a torch.save ``data.pkl`` of one tensor; imports nothing, calls nothing real."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            dtype = getattr(getattr(torch, name, None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return _StorageType(dtype)
        raise _NotPlain(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotPlain("not a storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise _NotPlain("not a typed storage")
        return _Storage(storage_type.dtype, str(key), numel)


class _Window(io.RawIOBase):
    """``length`` bytes of the open file ``f`` from ``start``, as a file of their own."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n]) if n else 0
        self.pos += got
        return got


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The contiguous ``tensor``'s memory, writable, as bytes."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _read_exact(f, position: int, into: memoryview) -> None:
    f.seek(position)
    while into.nbytes:
        n = f.readinto(into)
        if not n:
            raise ConversionError(f"{f.name} ends before the chunk it records")
        into = into[n:]
