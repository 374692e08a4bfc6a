"""The streamed export checks the checkpoint's checksums from the bytes it reads (issue 17).

No separate pass reads the checkpoint before the export; a byte that differs from what was
saved, in a chunk the export reads or in bytes it never reads, still fails the export in
one line and leaves no output behind.
"""

import json
import shutil
import zipfile

import pytest
import torch

from megabridge import checksums
from megabridge.conversion import dcp_reader
from megabridge.errors import CheckpointError
from megabridge.training import trust
from tests import conversion_checks as checks

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def converted(tmp_path_factory, single_process_megatron):
    """(HF folder, its megabridge checkpoint) of a tiny fp32 Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megabridge.conversion.auto_bridge import AutoBridge

    root = tmp_path_factory.mktemp("export-checksums")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(root / "hf"))
    return root / "hf", AutoBridge.from_hf_pretrained(root / "hf").save_megatron_checkpoint(
        root / "mcore"
    )


def _chunk_place(ckpt, fqn: str) -> tuple:
    """(file, offset, length) of the first stored chunk of ``fqn``."""
    storage = trust.read_metadata(ckpt).storage_data
    index = min((i for i in storage if i.fqn == fqn), key=lambda i: tuple(i.offset))
    info = storage[index]
    return ckpt / info.relative_path, info.offset, info.length


def _flip(path, position: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def _tensor_byte(ckpt) -> tuple:
    """A byte of the final norm's stored values: the export reads it."""
    path, offset, length = _chunk_place(ckpt, "decoder.final_layernorm.weight")
    with open(path, "rb") as f:
        chunk = dcp_reader._chunk(f, offset, length)
    return path, chunk.data_start  # the lowest byte of an fp32: the value stays finite


def _unread_byte(ckpt) -> tuple:
    """A byte of the same chunk's ``.format_version`` record, which nothing reads."""
    path, offset, length = _chunk_place(ckpt, "decoder.final_layernorm.weight")
    with open(path, "rb", buffering=0) as f:
        window = dcp_reader._Window(f, offset, length)
        with zipfile.ZipFile(window) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith(".format_version")]
            record = archive.getinfo(name)
        window.seek(record.header_offset)
        header = window.read(30)
    skip = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    return path, offset + record.header_offset + 30 + skip


def _export(ckpt, out):
    from megabridge.conversion.auto_bridge import AutoBridge

    bridge = AutoBridge.from_megatron_checkpoint(ckpt, check_content=False)
    return bridge.save_hf_from_checkpoint(out)


def test_an_intact_checkpoint_exports_bit_exact_and_every_byte_is_hashed(converted, tmp_path):
    hf, ckpt = converted
    out = _export(ckpt, tmp_path / "back")
    checks.assert_same_hf_folder(hf, out)
    # the verifier's digests, from memory plus the skipped bytes, equal a plain read's
    meta = json.loads((ckpt / "megabridge.json").read_text())
    verifier = checksums.ReadVerifier(ckpt, meta["checksums"])
    shard = sorted(ckpt.glob("*.distcp"))[0]
    data = shard.read_bytes()
    for start, end in ((100, 400), (0, 50), (300, 900), (5000, len(data) - 7)):  # out of order
        verifier.read(shard.resolve(), start, memoryview(data[start:end]))
    verifier.check()


@pytest.mark.parametrize("where", [_tensor_byte, _unread_byte], ids=["read", "never-read"])
def test_a_flipped_byte_fails_the_export_in_one_line_with_nothing_left(converted, tmp_path, where):
    _, original = converted
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original, ckpt)
    path, position = where(ckpt)
    _flip(path, position, 0x01)
    out = tmp_path / "back"
    with pytest.raises(CheckpointError) as raised:
        _export(ckpt, out)
    message = str(raised.value)
    assert f"{path.name} is damaged: its content differs" in message and "\n" not in message
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder either
