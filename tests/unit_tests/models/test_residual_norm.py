"""models/residual_norm.py: each residual add and the RMSNorm after it as one Triton kernel.

A model with the fused adds against the same model with Megatron's adds and separate norms:
the loss and every gradient bit for bit where Triton runs (the CPU through Triton's
interpreter in a process of its own; a GPU, scripts/gpu_smoke.sh, to fp32 rounding for the
gradients), in fp32. Where the fused add does not apply, Megatron's add runs unchanged."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.helpers import check_in_fresh_process

pytestmark = pytest.mark.unit

pytest.importorskip("triton")


def _config(**fields):
    from megabridge.models.config import ModelConfig

    base = dict(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=256, seq_length=16, bf16=False,
                transformer_impl="torch", share_embeddings_and_output_weights=False)  # fmt: skip
    return ModelConfig(**{**base, **fields})


def _loss_and_grads(cfg, fused: bool):
    """The loss and gradients of one batch, built with the fused adds or without them, and
    how many fused adds and separate norm kernels ran."""
    from megabridge.models import init as weight_init
    from megabridge.models import provider, residual_norm, triton_kernels

    calls = {"add_rms_norm": 0, "rms_norm": 0}
    originals = {name: getattr(triton_kernels, name) for name in calls}
    fuse = residual_norm.fuse_residual_norms

    def counted(name):
        def call(*args):
            calls[name] += 1
            return originals[name](*args)

        return call

    try:
        if not fused:
            residual_norm.fuse_residual_norms = lambda model: 0
        for name in calls:
            setattr(triton_kernels, name, counted(name))
        (model,) = provider.build_model(cfg)
        weight_init.initialize([model], cfg, seed=3)
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))
        device = next(model.parameters()).device
        tokens, positions = tokens.to(device), torch.arange(16, device=device).expand(2, -1)
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).sum()
        loss.backward()
    finally:
        residual_norm.fuse_residual_norms = fuse
        for name, original in originals.items():
            setattr(triton_kernels, name, original)
    norms = [m for m in model.modules() if hasattr(m, "_computed")]
    assert norms and all(m._computed is None for m in norms)  # every computed norm was taken
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, calls


def check_model() -> None:
    """Runs where Triton's kernels do: a GPU, or the CPU with TRITON_INTERPRET=1."""
    from megabridge import runtime

    runtime.init_distributed()
    runtime.init_model_parallel(1, 1)
    runtime.seed_everything(1234)
    cuda = torch.cuda.is_available()
    # fp32: bf16's rounding is the kernel test's (test_triton_kernels.py). Dense, MoE, and
    # with per-head q / k RMSNorms (not wired: no add before them).
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    for fields, qk_norms in (({}, 0), (moe, 0), ({"qk_layernorm": True}, 6)):
        cfg = _config(**fields)
        loss, grads, calls = _loss_and_grads(cfg, fused=False)
        fused_loss, fused_grads, fused_calls = _loss_and_grads(cfg, fused=True)
        # every add (the one before the final norm too) fused; the first input norm alone
        adds = 2 * cfg.num_layers
        assert calls == {"add_rms_norm": 0, "rms_norm": adds + 1 + qk_norms}, fields
        assert fused_calls == {"add_rms_norm": adds, "rms_norm": 1 + qk_norms}, fields
        assert torch.equal(fused_loss, loss), fields
        for name, grad in grads.items():
            if cuda:  # the GPU's attention backward accumulates with atomics, and an FMA may
                # fuse the norm gradient's last multiply with the add in fp32
                torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(fused_grads[name], grad), (fields, name)


def test_fused_adds_give_the_unfused_loss_and_gradients_bit_for_bit():
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    code = "import test_residual_norm as t; t.check_model()"
    check_in_fresh_process(Path(__file__).parent, code, interpret, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU without Triton's interpreter")
@pytest.mark.usefixtures("single_process_megatron")
def test_without_triton_the_adds_are_megatron_s_and_exact():
    cfg = _config()
    loss, grads, calls = _loss_and_grads(cfg, fused=False)
    wired_loss, wired_grads, wired_calls = _loss_and_grads(cfg, fused=True)
    assert calls == wired_calls == {"add_rms_norm": 0, "rms_norm": 0}
    assert torch.equal(wired_loss, loss)
    assert all(torch.equal(wired_grads[n], g) for n, g in grads.items())


@pytest.mark.parametrize(
    "fields, wired",
    [
        ({}, True),
        ({"recompute_granularity": "full"}, False),
        ({"recompute_granularity": "selective", "recompute_modules": ["layernorm"]}, False),
        ({"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}, True),
        ({"compile_layers": True}, False),
    ],
)
def test_where_the_adds_are_wired(fields, wired):
    from megabridge.models import residual_norm

    assert residual_norm.applies(_config(**fields)) is wired


def test_a_bias_dropout_or_other_operands_take_megatron_s_add():
    """At call time: a bias, dropout in training, or operands the kernel does not take."""
    from megabridge.models import residual_norm, torch_layers

    class Cfg:
        layernorm_zero_centered_gamma, params_dtype, sequence_parallel = False, torch.float32, False

    norm = torch_layers.RMSNorm(Cfg(), 8)
    megatron = []

    def bda(training, fused):
        return lambda output_with_bias, residual, prob: megatron.append(prob) or residual

    x = torch.randn(4, 2, 8)
    add = functools.partial(residual_norm._add_then_norm, bda, norm)
    assert add(True, False)((x, torch.ones(8)), x, 0.0) is x  # a bias
    assert add(True, False)((x, None), x, 0.1) is x  # dropout while training
    assert add(False, False)((x, None), x, 0.1) is x  # no Triton here (CPU)
    assert len(megatron) == 3 and norm._computed is None
