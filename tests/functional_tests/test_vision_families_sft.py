"""Nightly: Qwen3-VL, Qwen3-VL-MoE, Gemma 3 and LLaVA fine-tuned through the CLI on generated
colour questions, one process and two (the language model and the tower's layers split by
TP; Qwen3-VL also by PP, DeepStack's layers on the first stage; Qwen3-VL-MoE's
experts by EP): equal losses.
tests/unit_tests/data/test_vision_families_sft.py checks each family against transformers."""

import pytest

from tests.helpers import losses, megabridge, train
from tests.vision_models import save_colour_dataset, save_tiny_family_vl

pytestmark = [pytest.mark.integration, pytest.mark.skipduringci]

STEPS = 4
FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "gemma3_vl", "llava"]


def _overrides(root, hf, data) -> list[str]:
    return [
        f"checkpoint.pretrained_checkpoint={hf}", f"dataset.path={data}",
        f"train.train_iters={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2",
        "optimizer.lr=3e-3", "scheduler.lr_warmup_iters=1", "train.eval_interval=None",
        "logger.log_interval=1", "logger.tensorboard=false", f"checkpoint.save={root / 'ckpt'}",
        f"logger.log_dir={root / 'logs'}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return save_colour_dataset(tmp_path_factory.mktemp("colours"), count=16)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data):
    """family -> (its HF folder, the losses of one process), run on first use."""
    done = {}

    def get(family):
        if family not in done:
            root = tmp_path_factory.mktemp(family)
            hf = save_tiny_family_vl(family, root / "hf")
            result = megabridge([
                "finetune", "--recipe", f"{family}_tiny_finetune_config",
                *_overrides(root, hf, data),
            ])  # fmt: skip
            assert result.returncode == 0, result.stderr[-4000:]
            done[family] = hf, losses(root / "logs")
        return done[family]

    return get


@pytest.mark.parametrize(
    "family, layout",
    # Qwen3-VL-MoE: experts split (EP=2, the batch over two data-parallel ranks); its TP needs
    # sequence parallelism, which a vision tower does not take yet
    [
        *((f, "tensor") for f in FAMILIES if f != "qwen3_vl_moe"),
        ("qwen3_vl", "pipeline"),
        ("qwen3_vl_moe", "expert"),
    ],
)
def test_two_process_losses_equal_one_process(family, layout, one_process, data, tmp_path):
    hf, ref = one_process(family)
    assert sorted(ref) == list(range(1, STEPS + 1))
    overrides = _overrides(tmp_path, hf, data)
    train(
        2, f"{family}_tiny_finetune_config", [*overrides, f"model.{layout}_model_parallel_size=2"]
    )
    got = losses(tmp_path / "logs")
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), (step, loss, got[step])
