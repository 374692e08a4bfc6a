"""Streamed Megatron -> HF exports hold exactly the HF model's tensors, every family."""

import pytest
import torch

from megabridge.conversion.tiny import families, tiny_config
from tests import conversion_checks as checks
from tests.hf_models import save_tiny


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", families())
def test_streamed_export_is_bit_exact(family, tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge

    hf = save_tiny(tiny_config(family), tmp_path / "hf", dtype=torch.float32)
    bridge = AutoBridge.from_hf_pretrained(hf)
    ckpt = bridge.save_megatron_checkpoint(tmp_path / "mg")
    back = AutoBridge.from_megatron_checkpoint(ckpt).save_hf_from_checkpoint(tmp_path / "back")
    assert back is not None  # streamed, not built
    checks.assert_same_hf_folder(hf, back)
