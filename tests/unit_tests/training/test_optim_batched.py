"""training/optim.py's batched replacements for Megatron-Core's per-parameter loops (the
main-to-model param copy, the gradient clipping, the norm's read-back) change nothing: a few
bf16 steps with clipping give the same losses, norms and weights, to the bit, as Megatron-Core's
own code."""

import contextlib
import math

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
    # the gradients the last step applied: fused AdamW writes back those it divided
    grads = [p.grad.detach().clone() for p in s.optimizer.get_parameters()]
    return history, weights, main, grads


def test_batched_copies_norm_and_clipping_match_megatron_core_bit_for_bit(tmp_path, monkeypatch):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    from megabridge.training import optim

    # Megatron-Core's division and clipping passes in both runs (the path taken where AdamW
    # cannot divide by itself); the next test compares the two paths.
    monkeypatch.setattr(optim, "_adam_divides", lambda optimizer: False)
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


def test_token_division_and_clipping_inside_fused_adamw_match_the_separate_passes(
    tmp_path, monkeypatch
):
    """With torch's fused AdamW (the GPU's and the CPU's) the gradients stay sums over the
    tokens and Adam's grad_scale divides them by the count and clips them: the same losses,
    norms, fp32 weights and applied gradients as Megatron-Core's division and the clipping pass,
    to fp32 rounding. On a GPU this runs on CUDA."""
    from megabridge.training import optim, step

    calls = []
    on_device = step.step_deciding_on_device
    monkeypatch.setattr(
        step, "step_deciding_on_device", lambda *a: calls.append(on_device(*a)) or calls[-1]
    )
    inside = _train(tmp_path / "inside")
    assert len(calls) == 3 and all(tokens == 4 * 128 for _, tokens, _, _ in calls), calls
    monkeypatch.setattr(optim, "_adam_divides", lambda optimizer: False)
    separate = _train(tmp_path / "separate")
    assert len(calls) == 3  # the second run took upstream's passes

    for (loss_a, norm_a), (loss_b, norm_b) in zip(inside[0], separate[0], strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-5)
    for a, b in zip(inside[2], separate[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Adam barely sees a gradient's scale; the gradients themselves show the division and
    # the clipping (a missing 1/512 or clip coefficient is off by orders of magnitude)
    for a, b in zip(inside[3], separate[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_a_non_finite_step_is_skipped_inside_fused_adamw(tmp_path, monkeypatch):
    """The step decided on the device: a NaN loss (and NaN gradients) at iteration 2 changes
    neither the weights, the fp32 main weights, Adam's moments and step count, nor the
    learning rate schedule; iteration 3 steps again."""
    from megabridge.recipes import get_recipe
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides
    from megabridge.training.step import INJECT_NAN_AT, train_step

    monkeypatch.setenv(INJECT_NAN_AT, "2")
    cfg = apply_overrides(get_recipe("llama_tiny_pretrain_config"), [
        "model.bf16=true", "dataset.type=mock", "train.global_batch_size=4",
        "train.eval_interval=None", f"checkpoint.save={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}", "logger.tensorboard=false",
    ])  # fmt: skip
    s = loop.setup(cfg)

    def snapshot():
        inner = s.optimizer.optimizer
        moments = [t.clone() for st in inner.state.values() for t in st.values()]
        weights = [p.detach().clone() for p in s.model[0].parameters()]
        main = [p.detach().clone() for p in s.optimizer.get_parameters()]
        return weights + main + moments, s.scheduler.num_steps

    results = []
    for it in range(3):
        before = snapshot()
        results.append(train_step(cfg, s.model, s.optimizer, s.scheduler, s.train_data, it * 4))
        if it == 1:
            after = snapshot()
            assert after[1] == before[1]  # the schedule did not advance
            assert len(after[0]) == len(before[0])
            for a, b in zip(after[0], before[0], strict=True):
                assert torch.equal(a, b)
    (loss1, norm1, stepped1, _), (loss2, norm2, stepped2, _), (_, norm3, stepped3, _) = results
    assert stepped1 and stepped3 and not stepped2
    assert math.isnan(loss2) and math.isnan(norm2)
    assert math.isfinite(loss1) and norm1 > 0 and norm3 > 0
    assert s.scheduler.num_steps == 2 * 4
