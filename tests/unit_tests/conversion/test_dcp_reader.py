"""dcp_reader reads torch_dist tensor chunks in place, exactly as torch's own reader would."""

import warnings

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, load, save
from torch.distributed.checkpoint.api import CheckpointException

from megabridge.conversion import dcp_reader
from megabridge.conversion.streaming_export import _RegionPlanner
from megabridge.errors import ConversionError

pytestmark = pytest.mark.unit


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(8, 6, generator=gen).to(torch.bfloat16),
        "fp32_3d": torch.randn(2, 3, 4, generator=gen),
        "transposed": torch.randn(5, 7, generator=gen).t(),  # stored with its own strides
        "scalar": torch.tensor(3.5),
        "ints": torch.arange(10, dtype=torch.int64),
    }


@pytest.fixture
def saved(tmp_path):
    tensors = _tensors()
    with warnings.catch_warnings():  # torch's one-process notes
        warnings.simplefilter("ignore", UserWarning)
        save(tensors, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    return tmp_path, tensors


def _load(path, out: dict, planner=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load(out, storage_reader=dcp_reader.ChunkReader(str(path)), planner=planner, no_dist=True)


def _torch_reader_refused(monkeypatch) -> None:
    def refuse(self, plan, planner):
        raise AssertionError(f"torch's reader read {[i.storage_index.fqn for i in plan.items]}")

    monkeypatch.setattr(FileSystemReader, "read_data", refuse)


def test_whole_tensors_are_read_in_place_bit_exact(saved, monkeypatch):
    path, tensors = saved
    _torch_reader_refused(monkeypatch)
    out = {name: torch.full(t.shape, 7, dtype=t.dtype) for name, t in tensors.items()}
    _load(path, out)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


def test_regions_of_chunks_land_in_their_destinations(saved, monkeypatch):
    path, tensors = saved
    _torch_reader_refused(monkeypatch)
    rows = torch.zeros(3, 6, dtype=torch.bfloat16)  # a contiguous run of the chunk
    columns = torch.zeros(2, 3, 2)  # every row's middle: not one run
    part_of_transposed = torch.zeros(2, 5)
    regions = [
        ("bf16", (2, 0), rows),
        ("fp32_3d", (0, 0, 1), columns),
        ("transposed", (4, 0), part_of_transposed),
    ]
    _load(path, {}, _RegionPlanner(regions))
    assert torch.equal(rows, tensors["bf16"][2:5])
    assert torch.equal(columns, tensors["fp32_3d"][:, :, 1:3])
    assert torch.equal(part_of_transposed, tensors["transposed"][4:6])


def test_a_chunk_of_another_dtype_than_its_destination_is_refused(saved):
    path, _ = saved
    with pytest.raises(CheckpointException) as raised:  # torch wraps what its reader raised
        _load(path, {"bf16": torch.zeros(8, 6)})
    ((error, _),) = raised.value.failures.values()
    assert isinstance(error, ConversionError)
    assert "bf16 at (0, 0): chunk stored as torch.bfloat16, expected torch.float32" in str(error)


def test_a_chunk_in_another_form_goes_through_torchs_reader(saved, monkeypatch):
    path, tensors = saved
    monkeypatch.setattr(dcp_reader, "_chunk", lambda f, start, length: None)
    out = {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in tensors.items()}
    _load(path, out)
    for name, t in tensors.items():
        assert torch.equal(out[name], t), name


def test_a_truncated_file_is_an_error_not_zeros(saved):
    path, tensors = saved
    (distcp,) = path.glob("*.distcp")
    data = distcp.read_bytes()
    reader = dcp_reader.ChunkReader(str(path))
    stored = reader.read_metadata().storage_data
    first = min(stored.values(), key=lambda info: info.offset)
    distcp.write_bytes(data[: first.offset + first.length - 1])  # the first chunk's last byte
    with pytest.raises(CheckpointException):  # torch's reader or ours: either refuses
        _load(path, {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in tensors.items()})
