"""Checkpoints Megatron-LM, Megatron-Bridge and NeMo 2 wrote at TP=2 (and bf16 at TP=2, PP=2,
a MoE at EP=2): `megabridge convert megatron-to-hf` exports them bit-exact, and fine-tuning from one starts at the HF model's loss."""

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests import foreign_checkpoints
from tests.helpers import megabridge, torchrun
from tests.hf_models import save_tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tiny_config("llama"), tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def sources(llama, tmp_path_factory):
    """The HF models the checkpoints come from: fp32 Llama, bf16 Llama, fp32 Qwen3-MoE."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "fp32": llama,
        "bf16": save_tiny(tiny_config("llama"), root / "llama-bf16", dtype=torch.bfloat16),
        "moe": save_tiny(tiny_config("qwen3_moe"), root / "qwen3-moe"),
    }


@pytest.fixture(scope="module")
def foreign_tp2(llama, sources, tmp_path_factory):
    """Every kind, saved by a model loaded at TP=2, and the other LAYOUTS (bf16 at TP=2,
    PP=2, a MoE at EP=2), all in one 2-process launch."""
    out = tmp_path_factory.mktemp("foreign")
    result = torchrun(2, ["-m", "tests.foreign_checkpoints", str(llama), str(out), "--tp", "2",
                          "--layouts", str(sources["bf16"]), str(sources["moe"])])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("kind", foreign_checkpoints.KINDS)
def test_a_tp2_foreign_checkpoint_exports_bit_exact(llama, foreign_tp2, kind, tmp_path):
    _assert_streamed_export_is(llama, foreign_tp2 / kind, tmp_path / "back")


@pytest.mark.parametrize("name", foreign_checkpoints.LAYOUTS)
def test_each_tools_layout_at_tp2_bf16_pp2_and_moe_ep2_exports_bit_exact(
    sources, foreign_tp2, name, tmp_path
):
    kind, source = foreign_checkpoints.LAYOUTS[name][:2]
    _assert_streamed_export_is(sources[source], foreign_tp2 / name, tmp_path / "back")


def _assert_streamed_export_is(reference, checkpoint, out) -> None:
    """The CLI exports ``checkpoint`` streamed, with exactly the HF folder ``reference``'s tensors."""
    result = megabridge(
        ["convert", "megatron-to-hf", "--megatron-path", str(checkpoint), "--hf-path", str(out)]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(streamed)" in result.stdout + result.stderr
    checks.assert_same_tensors(reference, out)


def test_finetune_from_a_megatron_bridge_checkpoint_starts_at_the_hf_loss(
    llama, foreign_tp2, tmp_path
):
    from tests.helpers import losses

    run = megabridge([
        "finetune", "--recipe", "llama_tiny_finetune_config",
        "--pretrained", str(foreign_tp2 / "megatron-bridge"),
        "dataset.type=mock", "train.train_iters=2", "train.global_batch_size=2",
        "train.micro_batch_size=1", "train.eval_interval=None",
        f"logger.log_dir={tmp_path / 'logs'}", f"checkpoint.save={tmp_path / 'ckpt'}",
    ])  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert losses(tmp_path / "logs")[1] == pytest.approx(checks.hf_first_loss(llama), abs=1e-4)
