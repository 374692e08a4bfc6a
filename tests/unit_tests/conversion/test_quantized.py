"""Quantized checkpoints read as full precision (conversion/quantized.py).

A tiny DeepSeek-V3 is quantized here the way the FP8 release stores it (float8_e4m3fn
weights, float32 ``weight_scale_inv`` per 2-D block, partial edge blocks included),
then converted: its weights must be the reference dequantization, its logits those of
transformers (on the dequantized weights, and on the FP8 folder itself), and its export
a plain bf16 checkpoint.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megabridge.conversion import hf_io, quantized
from megabridge.conversion.tiny import tiny_config
from megabridge.errors import UserError
from tests.hf_models import save_tiny

pytestmark = pytest.mark.unit

BLOCK = (32, 32)  # small blocks, so tiny matrices have several, and partial ones (24 rows)
FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(BLOCK)}  # fmt: skip
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize(weight: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 weight and per-block scale_inv (weight ~ fp8 * scale), as the release stores them."""
    rows, cols = weight.shape
    br, bc = block
    scale = torch.empty(math.ceil(rows / br), math.ceil(cols / bc))
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * br : (i + 1) * br, j * bc : (j + 1) * bc].float()
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (tile / scale[i, j]).to(q.dtype)
    return q, scale


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, block=BLOCK) -> torch.Tensor:
    """Block by block: each block times its scale, in float32."""
    br, bc = block
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def _is_quantized(name: str) -> bool:
    # The release quantizes every linear of the layers except the router (mlp.gate).
    return ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight"))


@pytest.fixture(scope="module")
def fp8_and_reference(tmp_path_factory):
    """(FP8 folder, the same model with the reference-dequantized weights, the quantized names)."""
    root = tmp_path_factory.mktemp("fp8")
    source = save_tiny(tiny_config("deepseek_v3"), root / "source")
    tensors = load_file(str(source / "model.safetensors"))
    stored, reference, names = {}, {}, []
    for name, t in tensors.items():
        if _is_quantized(name):
            q, scale = quantize(t)
            stored[name], stored[name + "_scale_inv"] = q, scale
            reference[name] = reference_dequantize(q, scale)
            names.append(name)
        else:
            stored[name] = reference[name] = t
    config = json.loads((source / "config.json").read_text())
    for folder, weights, extra in (
        (root / "fp8", stored, {"quantization_config": FP8_CONFIG}),
        (root / "reference", reference, {}),
    ):
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
        shutil.copy(source / "generation_config.json", folder)
    return root / "fp8", root / "reference", names


def test_fp8_dequantization_equals_transformers_where_blocks_divide():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    weight = torch.randn(64, 96)
    q, scale = quantize(weight)
    ours = quantized.fp8_block_dequantize("w", q, scale, *BLOCK)
    for dtype in (torch.float32, torch.bfloat16):  # the dtype transformers loads into
        theirs = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=dtype)
        assert torch.equal(ours.to(dtype), theirs), dtype
    assert torch.equal(ours, reference_dequantize(q, scale))
    assert (ours.float() - weight).abs().max() < 0.1 * weight.abs().max()  # it is the weight


def test_fp8_partial_edge_blocks_and_bad_scales():
    q, scale = quantize(torch.randn(24, 40))  # 1 x 2 blocks, both partial
    assert torch.equal(
        quantized.fp8_block_dequantize("w", q, scale, *BLOCK), reference_dequantize(q, scale)
    )
    with pytest.raises(UserError, match=r"w_scale_inv has shape \(1, 1\).*needs \(1, 2\)"):
        quantized.fp8_block_dequantize("w", q, scale[:, :1], *BLOCK)


def test_reader_hides_scales_and_dequantizes(fp8_and_reference):
    fp8, reference, names = fp8_and_reference
    reader, ref = hf_io.HFCheckpoint(fp8), hf_io.HFCheckpoint(reference)
    assert sorted(reader.keys()) == sorted(ref.keys())  # no *_scale_inv
    for name in names:
        assert reader.dtype(name) == torch.bfloat16  # how it is exported
        assert torch.equal(reader.get(name), ref.get(name)), name
    plain = "model.embed_tokens.weight"
    assert reader.dtype(plain) == torch.float32 and torch.equal(reader.get(plain), ref.get(plain))


@pytest.mark.parametrize(
    "qconfig, message",
    [
        ({"quant_method": "awq"}, "quant_method='awq' are not supported yet"),
        ({**FP8_CONFIG, "activation_scheme": "static"}, "activation_scheme='static'"),
        ({**FP8_CONFIG, "weight_block_size": None}, "need weight_block_size"),
    ],
)
def test_unsupported_quantization_is_one_line(fp8_and_reference, tmp_path, qconfig, message):
    folder = shutil.copytree(fp8_and_reference[0], tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    with pytest.raises(UserError, match=message):
        hf_io.HFCheckpoint(folder)


@pytest.mark.usefixtures("single_process_megatron")
def test_fp8_deepseek_v3_converts_to_the_dequantized_model(fp8_and_reference, tmp_path):
    """Logits = transformers on the dequantized weights, and on the FP8 folder (which it
    dequantizes on a CPU); both conversion paths (in memory and streamed into a Megatron
    checkpoint) export the reference weights in bf16, without scales or quantization_config."""
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import hf_logits, megatron_logits, sample_tokens, verify
    from tests.conversion_checks import ATOL_FP32

    fp8, reference, names = fp8_and_reference
    bridge = AutoBridge.from_hf_pretrained(fp8)
    model = bridge.to_megatron_model()
    tokens = sample_tokens(256, 2, 16, seed=0)
    diff = megatron_logits(model, tokens) - hf_logits(reference, tokens, torch.float32, "cpu")
    assert diff.abs().max() <= ATOL_FP32
    result = verify(fp8, atol=ATOL_FP32)
    assert result.ok and result.top1_agreement == 1.0, result

    bridge.save_hf_pretrained(model, tmp_path / "in_memory")
    ckpt = bridge.save_megatron_checkpoint(tmp_path / "megatron")  # streamed, tensor by tensor
    back = AutoBridge.from_megatron_checkpoint(ckpt)
    back.save_hf_pretrained(back.to_megatron_model(), tmp_path / "streamed")
    ref = hf_io.HFCheckpoint(reference)
    for out in (tmp_path / "in_memory", tmp_path / "streamed"):
        exported = hf_io.HFCheckpoint(out)
        assert sorted(exported.keys()) == sorted(ref.keys())
        for name in ref.keys():
            want = ref.get(name).to(torch.bfloat16) if name in names else ref.get(name)
            assert exported.dtype(name) == want.dtype, name
            assert torch.equal(exported.get(name), want), name
        config = json.loads((out / "config.json").read_text())
        assert "quantization_config" not in config
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
