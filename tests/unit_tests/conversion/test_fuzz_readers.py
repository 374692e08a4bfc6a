"""Property-based: whatever bytes a safetensors file or config.json holds, reading it either
works or ends in megabridge's own one-line error (UserError), never another exception.

hypothesis builds headers and configs near the valid ones (right keys, wrong values) as
well as plain garbage, and shrinks a failure to its smallest input.
"""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megabridge.conversion import hf_io
from megabridge.errors import UserError
from tests.hf_models import save_tiny

pytestmark = pytest.mark.unit

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# JSON values of every kind, small: what a field may hold in a hostile file
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
small_ints = st.integers(-4, 40)
dtypes = st.sampled_from([*hf_io._DTYPES, "F8_E4M3", "U32", "", "f32"])
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes | json_values,
        "shape": st.lists(small_ints, max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-8, 300), min_size=2, max_size=2) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4) | json_values


def _one_line_user_error(err: UserError) -> None:
    assert isinstance(err, UserError)
    assert "\n" not in str(err), str(err)


def _write_safetensors(folder: Path, header: bytes, data: bytes, claimed: int | None) -> None:
    n = len(header) if claimed is None else claimed
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + header + data)


@FUZZ
@given(
    header=headers.map(lambda h: json.dumps(h).encode()) | st.binary(max_size=64),
    data=st.binary(max_size=300),
    claimed=st.none() | st.integers(0, 2**64 - 1),
)
def test_safetensors_header_reader_never_fails_unexpectedly(header, data, claimed):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        _write_safetensors(folder, header, data, claimed)
        try:
            ckpt = hf_io.HFCheckpoint(folder)
            for name in ckpt.keys():
                try:
                    tensor = ckpt.get(name)
                except UserError as e:  # NaN / Inf in random bytes: refused, in one line
                    _one_line_user_error(e)
                    continue
                assert tuple(tensor.shape) == ckpt.shape(name)
                assert tensor.dtype == ckpt.dtype(name)
        except UserError as e:
            _one_line_user_error(e)


@pytest.fixture(scope="module")
def tiny_llama_files(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return save_tiny(config, tmp_path_factory.mktemp("fuzz") / "llama")


CONFIG_KEYS = [
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "rope_theta",
    "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "model_type", "architectures",
    "attention_bias", "hidden_act",
]  # fmt: skip


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), small_ints | json_values, max_size=4),
    garbage=st.none() | json_values.filter(lambda v: not isinstance(v, dict)),
)
def test_hf_config_reader_never_fails_unexpectedly(tiny_llama_files, changes, garbage):
    from megabridge.conversion.auto_bridge import AutoBridge

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(tiny_llama_files, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config if garbage is None else garbage))
        try:
            bridge = AutoBridge.from_hf_pretrained(folder)
        except UserError as e:
            _one_line_user_error(e)
            return
        cfg = bridge.model_config
        assert cfg.hidden_size > 0 and cfg.num_layers > 0 and cfg.vocab_size > 0
        assert torch.is_tensor(bridge.source.get(bridge.source.keys()[0]))
