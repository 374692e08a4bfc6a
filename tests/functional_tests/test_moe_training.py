"""MoE training on the CPU: a tiny Qwen3-MoE at EP=2 learns, and matches EP=1 step for step."""

import pytest

from tests.helpers import losses, train

pytestmark = pytest.mark.integration

RECIPE = "qwen3_moe_tiny_pretrain_config"
QUICK = [
    "train.train_iters=5",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "scheduler.lr_warmup_iters=1",
    "scheduler.lr_decay_iters=5",
    "checkpoint.save_interval=None",
]


def test_ep2_trains_and_matches_ep1(tmp_path):
    # models/init.py draws every expert by its global name, so both layouts start equal.
    train(
        1,
        RECIPE,
        [*QUICK, f"logger.log_dir={tmp_path / 'ep1'}", f"checkpoint.save={tmp_path / 'c1'}"],
    )
    train(2, RECIPE, [*QUICK, "model.expert_model_parallel_size=2",
                      f"logger.log_dir={tmp_path / 'ep2'}", f"checkpoint.save={tmp_path / 'c2'}"])  # fmt: skip
    ep1, ep2 = losses(tmp_path / "ep1"), losses(tmp_path / "ep2")
    assert sorted(ep2) == [1, 2, 3, 4, 5]
    assert all(loss == loss and abs(loss) < float("inf") for loss in ep2.values()), ep2
    assert ep2[5] < ep2[1], ep2
    for it in ep1:
        assert ep2[it] == pytest.approx(ep1[it], rel=1e-4), (it, ep1, ep2)
