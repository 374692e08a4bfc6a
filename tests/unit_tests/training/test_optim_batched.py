"""training/optim.py's batched replacements for Megatron-Core's per-parameter loops (the
main-to-model param copy, the gradient clipping, the norm's read-back) change nothing: a few
bf16 steps with clipping give the same losses, norms and weights, to the bit, as Megatron-Core's
own code."""

import contextlib

import pytest
import torch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]


def _train(tmp_path, steps: int = 3):
    from megabridge.recipes import get_recipe
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides
    from megabridge.training.step import train_step

    cfg = apply_overrides(get_recipe("llama_tiny_pretrain_config"), [
        "model.bf16=true", "dataset.type=mock", "optimizer.clip_grad=0.05",
        "train.global_batch_size=4", "train.eval_interval=None",
        f"checkpoint.save={tmp_path / 'ckpt'}", f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard=false",
    ])  # fmt: skip
    s = loop.setup(cfg)
    history = []
    for it in range(steps):
        loss, norm, stepped, _ = train_step(
            cfg, s.model, s.optimizer, s.scheduler, s.train_data, it * 4
        )
        assert stepped and norm > 0.05  # clipped
        history.append((loss, norm))
    weights = {n: p.detach().clone() for n, p in s.model[0].named_parameters()}
    main = [p.detach().clone() for p in s.optimizer.get_parameters()]
    return history, weights, main


def test_batched_copies_norm_and_clipping_match_megatron_core_bit_for_bit(tmp_path, monkeypatch):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megabridge.training import optim

    ours = _train(tmp_path / "ours")
    monkeypatch.setattr(optim, "_batch_main_to_model_copy", lambda optimizer: None)
    monkeypatch.setattr(optim, "_clip_grads", clip_grad_by_total_norm_fp32)
    monkeypatch.setattr(optim, "_l2_norm_with_one_host_copy", contextlib.nullcontext)
    upstream = _train(tmp_path / "upstream")

    assert ours[0] == upstream[0]  # losses and grad norms, as floats
    assert ours[1].keys() == upstream[1].keys()
    for name, weight in ours[1].items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, upstream[1][name]), name
    for a, b in zip(ours[2], upstream[2], strict=True):
        assert torch.equal(a, b)
