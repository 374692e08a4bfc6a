import json

import pytest
import torch
from safetensors.torch import save_file

from megabridge.conversion import hf_io
from megabridge.errors import ConversionError, UserError

pytestmark = pytest.mark.unit


def _folder(tmp_path, tensors):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_reads_lazily_with_dtypes_and_shapes(tmp_path):
    folder = _folder(tmp_path, {"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4)})
    ckpt = hf_io.HFCheckpoint(folder)
    assert sorted(ckpt.keys()) == ["a", "b"]
    assert ckpt.dtype("a") == torch.bfloat16 and ckpt.shape("a") == (2, 3)
    assert torch.equal(ckpt.get("b"), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_slice_of_a_stacked_tensor_is_read_alone(tmp_path, dtype):
    """An expert's slice of a tensor stacking all experts (Llama 4's gate_up_proj), from its
    own bytes: equal to the whole tensor's slice, for every slice."""
    gen = torch.Generator().manual_seed(0)
    stacked = torch.randn(5, 3, 4, generator=gen).to(dtype)
    tensors = {"before": torch.randn(7, generator=gen).to(dtype), "experts": stacked}
    ckpt = hf_io.HFCheckpoint(_folder(tmp_path, tensors))
    for e in range(5):
        assert torch.equal(ckpt.get_index("experts", e), stacked[e]), e
    with pytest.raises(ConversionError, match=r"experts \(5, 3, 4\) has no slice 5"):
        ckpt.get_index("experts", 5)


def test_truncated_file_is_named(tmp_path):
    folder = _folder(tmp_path, {"a": torch.ones(64, 64)})
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="model.safetensors is truncated"):
        hf_io.HFCheckpoint(folder)


def test_garbage_file_is_named(tmp_path):
    folder = _folder(tmp_path, {"a": torch.ones(2)})
    (folder / "model.safetensors").write_bytes(b"\xff" * 7)
    with pytest.raises(ConversionError, match="not a valid safetensors file"):
        hf_io.HFCheckpoint(folder)


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf_io.HFCheckpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        hf_io.HFCheckpoint(tmp_path)


def test_sharded_writer_greedy_and_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    hf_io.write_hf_folder(tmp_path, tensors.items(), {"a": 1}, max_shard_bytes=2048)
    index = json.loads((tmp_path / hf_io.INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3
    ckpt = hf_io.HFCheckpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(ckpt.get(name), t)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/elsewhere.safetensors", "link"])
def test_index_naming_files_outside_the_folder_is_refused(tmp_path, shard):
    outside = _folder(tmp_path / "outside", {"a": torch.ones(2)}) / "model.safetensors"
    folder = _folder(tmp_path / "model", {"a": torch.ones(2)})
    (folder / "link").symlink_to(outside)  # a link inside that leads out
    if shard != "link":
        shard = shard.replace("/tmp/elsewhere.safetensors", str(outside))
        (folder / "../outside.safetensors").write_bytes(outside.read_bytes())
    (folder / hf_io.INDEX).write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(ConversionError, match="names shard files outside"):
        hf_io.HFCheckpoint(folder)
