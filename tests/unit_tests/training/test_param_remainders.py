"""optimizer.store_param_remainders: the bf16 optimizer's fp32 main weights held as the bf16
model weights and int16 remainders (training/optim.py _keep_remainders), where the Triton AdamW
steps (a GPU; without one, the CPU in a process running Triton's interpreter). The main
weights lose their storage, the first step computes the fp32 path's weights, and a checkpoint
written from the halves resumes exactly."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

from megabridge.training.optim import inner_optimizers
from tests.helpers import check_in_fresh_process

pytestmark = pytest.mark.unit

pytest.importorskip("triton")

_OVERRIDES = [
    "model.bf16=true", "dataset.type=mock", "train.global_batch_size=4",
    "train.eval_interval=None", "logger.tensorboard=false",
]  # fmt: skip


def _setup(tmp: Path, name: str, remainders: bool):
    from megabridge.recipes import get_recipe
    from megabridge.training import loop
    from megabridge.training.config import apply_overrides

    cfg = apply_overrides(get_recipe("llama_tiny_pretrain_config"), [
        *_OVERRIDES, f"optimizer.store_param_remainders={remainders}",
        f"checkpoint.save={tmp / name}", f"logger.log_dir={tmp / (name + '_logs')}",
    ])  # fmt: skip
    return cfg, loop.setup(cfg)


def _steps(cfg, s, first: int, count: int) -> list[float]:
    from megabridge.training.step import train_step

    losses = []
    for it in range(first, first + count):
        loss, _, stepped, _ = train_step(
            cfg, s.model, s.optimizer, s.scheduler, s.train_data, it * 4
        )
        assert stepped
        losses.append(loss)
    return losses


def _weights(s) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.model[0].named_parameters()}


def _fp32_mains(optimizer) -> list[torch.Tensor]:
    from megabridge.training import optim

    mains = []
    for opt in inner_optimizers(optimizer):
        if hasattr(opt, optim._REMAINDERS):
            mains += [t for group in optim._main_values(opt) for t in group]
        else:
            mains += [p.detach().clone() for group in opt.fp32_from_float16_groups for p in group]
    return mains


def _main_params(optimizer) -> list[torch.Tensor]:
    return [
        p
        for opt in inner_optimizers(optimizer)
        for group in opt.fp32_from_float16_groups
        for p in group
    ]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def check_remainders(tmp: str) -> None:
    """Runs in a process of its own: with TRITON_INTERPRET=1 on the CPU, as it is on a GPU.
    A GPU's attention backward accumulates with atomics (two runs' gradients may differ in
    the last bits), so there the two paths' values are compared to fp32 rounding instead of
    bit for bit; what is saved, loaded, split and joined is compared bit for bit on both.

    On the CPU only the AdamW is interpreted (optim binds runs_on at import); the model's
    norm, SwiGLU and cross-entropy kernels take their torch math, as without the interpreter
    (test_triton_kernels checks them against it): interpreted, they took ~97% of a 260 s
    test. Were the AdamW's switched off too, the remainders would not be made, and the first
    assertion below fails."""
    from megabridge.models import triton_kernels

    on_cuda = triton_kernels.runs_on
    with mock.patch.object(triton_kernels, "runs_on", lambda t: t.is_cuda and on_cuda(t)):
        _check_remainders(Path(tmp))


def _check_remainders(tmp: Path) -> None:
    from megabridge import runtime
    from megabridge.training import checkpointing, optim

    exact = not torch.cuda.is_available()

    def same(a: list, b: list) -> None:
        for x, y in zip(a, b, strict=True):
            if exact:
                assert torch.equal(_bits(x), _bits(y))
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)

    runtime.init_distributed()
    runtime.init_model_parallel(1, 1)

    runtime.seed_everything(1234)
    cfg_plain, plain = _setup(tmp, "plain", remainders=False)
    runtime.seed_everything(1234)
    cfg, halved = _setup(tmp, "halved", remainders=True)
    opt = halved.optimizer
    mains = _main_params(opt)
    assert mains and all(p.stride() == (0,) * p.dim() and p.isnan().all() for p in mains)
    remainders = [r for o in inner_optimizers(opt) for r in getattr(o, optim._REMAINDERS).values()]
    assert sum(r.numel() for r in remainders) == sum(p.numel() for p in mains)
    for o in inner_optimizers(plain.optimizer):  # the option off: the fp32 copies are kept
        assert not hasattr(o, optim._REMAINDERS)
    for a, b in zip(_fp32_mains(plain.optimizer), _fp32_mains(opt), strict=True):
        assert torch.equal(_bits(a), _bits(b))  # the same start

    # step 1 from the same weights: the fp32 values are the fp32 path's, bit for bit; later
    # steps differ only where a bf16 weight was an exact tie (rounded away from zero here)
    assert _steps(cfg_plain, plain, 0, 1) == _steps(cfg, halved, 0, 1)
    same(_fp32_mains(plain.optimizer), _fp32_mains(opt))
    later_plain, later = _steps(cfg_plain, plain, 1, 2), _steps(cfg, halved, 1, 2)
    assert later == pytest.approx(later_plain, rel=1e-3)

    saved_mains = _fp32_mains(opt)
    path = checkpointing.save(tmp / "ckpt", 3, halved.model, opt, halved.scheduler, {}, cfg.model)
    assert all(p.stride() == (0,) * p.dim() for p in mains)  # no fp32 copy kept after saving
    uninterrupted = _steps(cfg, halved, 3, 2)
    weights, final_mains = _weights(halved), _fp32_mains(opt)

    runtime.seed_everything(99)  # other initial weights: the checkpoint replaces them all
    cfg_again, again = _setup(tmp, "again", remainders=True)
    checkpointing.load(path, again.model, again.optimizer, again.scheduler)
    for a, b in zip(saved_mains, _fp32_mains(again.optimizer), strict=True):
        assert torch.equal(_bits(a), _bits(b))  # the checkpoint held the fp32 values
    resumed = _steps(cfg_again, again, 3, 2)
    assert resumed == (uninterrupted if exact else pytest.approx(uninterrupted, rel=1e-5))
    if exact:
        for name, w in _weights(again).items():
            assert torch.equal(w, weights[name]), name
    same(final_mains, _fp32_mains(again.optimizer))

    # reload_model_params: the main weights become the model's bf16 values exactly
    again.optimizer.reload_model_params()
    models = [p for o in inner_optimizers(again.optimizer) for g in o.float16_groups for p in g]
    for model, main in zip(models, _fp32_mains(again.optimizer), strict=True):
        assert torch.equal(_bits(main), _bits(model.detach().float()))


def test_remainders_train_as_fp32_main_weights_and_resume_exactly(tmp_path):
    # without a GPU, the CPU takes the GPU's Triton AdamW in Triton's interpreter
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    code = f"import test_param_remainders as t; t.check_remainders({str(tmp_path)!r})"
    check_in_fresh_process(Path(__file__).parent, code, interpret, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU steps with the Triton AdamW")
def test_without_a_triton_adamw_the_fp32_main_weights_stay(tmp_path, single_process_megatron):
    """On the CPU (no interpreter) torch's fused AdamW steps: the option changes nothing."""
    from megabridge.training import optim

    _, s = _setup(tmp_path, "cpu", remainders=True)
    assert not any(hasattr(o, optim._REMAINDERS) for o in inner_optimizers(s.optimizer))
    mains = _main_params(s.optimizer)
    assert mains and all(p.is_contiguous() and p.isfinite().all() for p in mains)


def test_main_weights_from_a_state_dict_are_refused_as_upstream_refuses_them():
    """reload_model_params(state_dict) with remainders: upstream asserts it is not supported;
    here it is refused in one line, before any remainder changes."""
    from megabridge.training import optim

    with pytest.raises(NotImplementedError, match="not supported yet"):
        optim._model_to_main_halves(None, state_dict={})
