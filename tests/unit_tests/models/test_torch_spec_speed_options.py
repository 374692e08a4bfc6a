"""The torch spec's speed options on the CPU: FP8 linears (models/fp8.py: the scaling math,
emulated, and where it refuses to run) and the recomputed SwiGLU (models/swiglu_recompute.py)."""

import contextlib
import logging

import pytest
import torch

from megabridge.errors import ConfigError
from megabridge.models import fp8, swiglu_recompute
from megabridge.models import init as weight_init
from megabridge.models.config import ModelConfig, validate_model_config
from megabridge.models.provider import build_model

pytestmark = pytest.mark.unit


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_tensorwise_maps_the_largest_magnitude_onto_the_format_maximum():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3.0
    x_fp8, scale = fp8.quantize(x, fp8.E4M3, rowwise=False)
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.shape == ()
    assert x_fp8.float().abs().max().item() == 448.0
    # e4m3 keeps 3 mantissa bits: every normal value within 2^-4 of itself, relatively.
    big = x.abs() > x.abs().max() / 64
    err = ((x_fp8.float() * scale - x).abs() / x.abs())[big]
    assert err.max().item() <= 2**-4


def test_rowwise_scales_each_row_by_a_power_of_two():
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    x[3] *= 1000.0  # one outlier row
    x_fp8, scale = fp8.quantize(x, fp8.E4M3, rowwise=True)
    assert scale.shape == (8, 1)
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))
    row_max = x_fp8.float().abs().amax(dim=1)
    assert bool(((row_max > 224.0) & (row_max <= 448.0)).all())  # each row uses the range
    torch.testing.assert_close(x_fp8.float() * scale, x, rtol=2**-4, atol=0.0)


def test_an_all_zero_tensor_quantises_to_zero():
    for rowwise in (False, True):
        x_fp8, scale = fp8.quantize(torch.zeros(4, 16), fp8.E4M3, rowwise=rowwise)
        assert torch.isfinite(scale).all() and not x_fp8.float().any()


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_linear_forward_and_backward_are_close_to_bf16(recipe):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(48, 64, generator=gen) * 0.05).to(torch.bfloat16).requires_grad_()
    grad_y = torch.randn(3, 16, 48, generator=gen).to(torch.bfloat16)
    y = fp8.fp8_linear(x, w, recipe, emulate=True)
    y.backward(grad_y)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y_ref = x_ref @ w_ref.t()
    y_ref.backward(grad_y.float())
    assert y.shape == (3, 16, 48) and y.dtype == torch.bfloat16
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    # FP8 rounding (2^-4 per operand for e4m3, 2^-3 for e5m2) averages down in the sums.
    assert _rel(y, y_ref) < 0.05
    assert _rel(x.grad, x_ref.grad) < 0.08
    assert _rel(w.grad, w_ref.grad) < 0.08
    assert _rel(y, y_ref) > 1e-4  # it did round: the reference is not what was computed


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_the_scaled_mm_operand_layouts_match_the_emulation(monkeypatch, recipe):
    """torch._scaled_mm (it has a CPU kernel) takes the operands as laid out for the GPU's:
    left row-major, right column-major, in all three GEMMs; results equal the emulation."""
    monkeypatch.setattr(fp8, "_quantize_fn", lambda emulate: fp8.quantize)  # no compile here
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    w = (torch.randn(48, 32, generator=gen) * 0.1).to(torch.bfloat16)
    grad_y = torch.randn(64, 48, generator=gen).to(torch.bfloat16)
    outs = []
    for emulate in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.FP8Linear.apply(xi, wi, recipe, emulate)
        y.backward(grad_y)
        outs.append((y, xi.grad, wi.grad))
    for real, emulated in zip(*outs, strict=True):
        torch.testing.assert_close(real, emulated, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("recipe,graphs", [("tensorwise", 2), ("rowwise", 1)])
def test_the_compiled_cast_traces_one_graph_per_format(monkeypatch, recipe, graphs):
    """The GPU's compiled quantize sees activations that require grad and are views of a
    bigger tensor (the norm's output reshaped), others that are not, weights and gradients:
    dynamo guards on requires_grad and on a view's base, so each kind traced a graph of its
    own (4 for tensorwise's two formats before the operands went in detached). One graph per
    FP8 format, none after the first step: far from dynamo's recompile limit (8), whatever
    mix of layouts a GPU's kernels hand over. A counting backend: dynamo's part only. The
    compiled graphs are element-wise: the amax is aten's."""
    traced = []

    def counting_backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compile_(fn, **kw, backend=counting_backend)
    )
    monkeypatch.setattr(fp8, "_compiled", {})
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(16, 4, 32, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(128, 32, generator=gen) * 0.1).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(32, 64, generator=gen) * 0.1).to(torch.bfloat16).requires_grad_()
    per_step = []
    with _no_torch_function_modes():  # as on a GPU
        for _ in range(2):
            x = (base * 1.0).reshape(-1, 32)  # a view that requires grad
            y = fp8.FP8Linear.apply(x, w1, recipe, False)
            h = torch.nn.functional.silu(y[:, :64]) * y[:, 64:]  # a new tensor
            fp8.FP8Linear.apply(h, w2, recipe, False).float().square().sum().backward()
            per_step.append(len(traced))
    torch._dynamo.reset()
    assert per_step == [graphs, graphs]
    # the amax stays with aten: inductor's whole-tensor reduction under symbolic shapes ran on
    # a few blocks (13 ms a cast on an H200, FP8 training 20x slower than bf16)
    ops = {str(n.target) for gm in traced for n in gm.graph.nodes if n.op.startswith("call_")}
    assert not {op for op in ops if "amax" in op or "norm" in op or "max" in op.split(".")[-1]}, ops


@contextlib.contextmanager
def _no_torch_function_modes():
    """The torch-function modes off for a while. A test before this one may have started the
    CPU runtime, whose CudaToCpuMode stays on for the life of the process (runtime.py); with
    it, quantize's calls met different mode stacks (dynamo's recompile log:
    ___check_torch_function_mode_stack) and rowwise traced 2 graphs in CI's order. A GPU run
    has no such mode."""
    modes = []
    while torch._C._len_torch_function_stack():
        modes.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def test_rowwise_keeps_an_outlier_row_from_spoiling_the_others():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 64, generator=gen)
    x[0] *= 1e5  # the other rows fall into e4m3's subnormals under one tensor scale
    w = torch.randn(16, 64, generator=gen) * 0.1
    exact = x[1:] @ w.t()
    errors = {r: _rel(fp8.fp8_linear(x, w, r, emulate=True)[1:], exact) for r in fp8.RECIPES}
    assert errors["rowwise"] < 0.05 and errors["tensorwise"] > 0.2


def test_refused_without_a_gpu_or_fp8_tensor_cores_or_with_tp(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="not supported yet without a GPU"):
        fp8.check_fp8_supported("tensorwise", 1, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(ConfigError, match="compute capability 8.9"):
        fp8.check_fp8_supported("rowwise", 1, False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(ConfigError, match="tensor parallelism is not supported yet"):
        fp8.check_fp8_supported("rowwise", 2, False)
    fp8.check_fp8_supported("rowwise", 1, False)  # an H100 / H200 at TP 1


def _tiny(**kw) -> ModelConfig:
    kw = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, vocab_size=128, seq_length=32, bf16=True,
              transformer_impl="torch", recompute_swiglu=False) | kw  # fmt: skip
    return ModelConfig(**kw)


def _loss_and_grads(cfg: ModelConfig, tokens: torch.Tensor):
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    positions = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return model, loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.usefixtures("single_process_megatron")
def test_a_cpu_run_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.fp8 is not supported yet without a GPU"):
        build_model(_tiny(fp8="tensorwise"))


@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_the_torch_spec_model_in_fp8_matches_bf16(monkeypatch, recipe):
    """The whole model, the block linears emulated in FP8 on the CPU, against bf16."""
    monkeypatch.setattr(fp8, "check_fp8_supported", lambda *a: None)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    model, loss, grads = _loss_and_grads(_tiny(fp8=recipe), tokens)
    _, ref_loss, ref_grads = _loss_and_grads(_tiny(), tokens)
    layer = model.decoder.layers[0]
    linears = (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
               layer.mlp.linear_fc1, layer.mlp.linear_fc2)  # fmt: skip
    assert all(isinstance(m, fp8._FP8Forward) for m in linears)
    assert not isinstance(model.output_layer, fp8._FP8Forward)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.01
    assert grads.keys() == ref_grads.keys()
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert 1e-4 < _rel(grads[name], ref_grads[name]) < 0.15


def _in_fp8(model) -> list[bool]:
    flags = []
    for layer in model.decoder.layers:
        linears = (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                   layer.mlp.linear_fc1, layer.mlp.linear_fc2)  # fmt: skip
        kinds = {isinstance(m, fp8._FP8Forward) for m in linears}
        assert len(kinds) == 1  # a layer's four linears alike
        flags.append(kinds.pop())
    return flags


@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, [True] * 4),
        ({"first_last_layers_bf16": True}, [False, True, True, False]),
        (
            {
                "first_last_layers_bf16": True,
                "num_layers_at_start_in_bf16": 2,
                "num_layers_at_end_in_bf16": 0,
            },
            [False, False, True, True],
        ),  # fmt: skip
        ({"num_layers_at_start_in_bf16": 2}, [True] * 4),  # counts alone change nothing
        ({"first_last_layers_bf16": True, "recompute_swiglu": True}, [False, True, True, False]),
    ],
)
def test_first_last_layers_bf16_keeps_those_layers_out_of_fp8(monkeypatch, kw, expected):
    monkeypatch.setattr(fp8, "check_fp8_supported", lambda *a: None)
    (model,) = build_model(_tiny(num_layers=4, fp8="rowwise", **kw), meta=True)
    assert _in_fp8(model) == expected
    fc2 = [type(layer.mlp.linear_fc2) for layer in model.decoder.layers]
    if kw.get("recompute_swiglu"):  # the bf16 layers' fc2 recomputes SwiGLU in bf16
        assert fc2 == [swiglu_recompute.SwiGLURowParallelLinear,
                       *[swiglu_recompute.FP8SwiGLURowParallelLinear] * 2,
                       swiglu_recompute.SwiGLURowParallelLinear]  # fmt: skip
    else:
        assert swiglu_recompute.SwiGLURowParallelLinear not in fc2


@pytest.mark.usefixtures("single_process_megatron")
def test_a_model_with_every_layer_kept_in_bf16_is_the_bf16_model(monkeypatch):
    monkeypatch.setattr(fp8, "check_fp8_supported", lambda *a: None)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    kept = dict(fp8="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                num_layers_at_end_in_bf16=1)  # fmt: skip
    model, loss, grads = _loss_and_grads(_tiny(**kept), tokens)
    _, ref_loss, ref_grads = _loss_and_grads(_tiny(), tokens)
    assert _in_fp8(model) == [False, False]
    assert loss.item() == ref_loss.item()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


def test_bf16_layer_counts_outside_the_model_are_refused():
    cfg = _tiny(fp8="tensorwise", first_last_layers_bf16=True, num_layers_at_end_in_bf16=3)
    with pytest.raises(ConfigError, match="num_layers_at_end_in_bf16=3 must be between 0 and "
                       "num_layers=2"):  # fmt: skip
        validate_model_config(cfg)


@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_with_recomputed_swiglu_is_fp8_without_it_keeping_less(monkeypatch, recipe):
    """model.recompute_swiglu=true under model.fp8: fc2 recomputes SwiGLU's output and casts
    it again in backward (the same FP8 values): the loss and every gradient of FP8 without
    it, bit for bit, and fc2 no longer keeps its input (a, or its FP8 copy) for backward."""
    from megabridge.models import provider
    from megabridge.models.activation_memory import SavedTensorLog

    monkeypatch.setattr(fp8, "check_fp8_supported", lambda *a: None)
    # Without the recompute, SwiGLU as the GPU runs it: the activation module (on the CPU its
    # torch math, the recompute's), not Megatron's bf16 autograd of silu(gate) * up
    fusions = provider._gpu_fusions
    monkeypatch.setattr(
        provider, "_gpu_fusions", lambda cfg: fusions(cfg) | {"use_te_activation_func": True}
    )
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    kept = {}
    runs = {}
    for recompute in (True, False):
        cfg = _tiny(fp8=recipe, recompute_swiglu=recompute)
        (model,) = build_model(cfg)
        weight_init.initialize([model], cfg, seed=7)
        positions = torch.arange(16).expand(2, -1)
        with SavedTensorLog(model) as log:
            loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        fc2 = model.decoder.layers[0].mlp.linear_fc2
        assert isinstance(fc2, swiglu_recompute.FP8SwiGLURowParallelLinear) is recompute
        mlp = "decoder.layers.0.mlp"
        kept[recompute] = sum(s.nbytes for s in log.saved.values() if s.module.startswith(mlp))
        runs[recompute] = loss, {n: p.grad for n, p in model.named_parameters()}
    (loss, grads), (ref_loss, ref_grads) = runs[True], runs[False]
    assert loss.item() == ref_loss.item()
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    # The MLP keeps fc1's output h either way (SwiGLU's module or fc2); without the recompute
    # also SwiGLU's output a [32 tokens, 128] for dW: on the CPU tensorwise as FP8 with its
    # scale, rowwise in bf16 (on the GPU both as FP8 a^T with scales)
    a_bytes = 32 * 128 + 4 if recipe == "tensorwise" else 32 * 128 * 2
    assert kept[False] - kept[True] == a_bytes, kept


@pytest.mark.usefixtures("single_process_megatron")
def test_fp8_with_another_spec_is_refused():
    cfg = _tiny(fp8="rowwise")
    cfg.transformer_impl = "local"
    with pytest.raises(ConfigError, match="torch layer spec only"):
        build_model(cfg, meta=True)


def test_recomputed_swiglu_with_a_frozen_weight_gives_the_input_gradient_alone():
    """fc2 frozen (LoRA tunes adapters beside it): its backward skips the recomputed output and
    the weight gradient, and h's gradient is the trainable case's, and the plain math's."""
    gen = torch.Generator().manual_seed(3)
    h, w = torch.randn(6, 2 * 8, generator=gen), torch.randn(5, 8, generator=gen) * 0.3
    grad_y = torch.randn(6, 5, generator=gen)
    SwiGLUThenLinear = swiglu_recompute._SwiGLUThenLinear
    frozen = h.clone().requires_grad_()
    (dh_frozen,) = torch.autograd.grad(SwiGLUThenLinear.apply(frozen, w, False), frozen, grad_y)
    leaves = (h.clone().requires_grad_(), w.clone().requires_grad_())
    dh, dw = torch.autograd.grad(SwiGLUThenLinear.apply(*leaves, False), leaves, grad_y)
    assert torch.equal(dh_frozen, dh)
    ref = (h.clone().requires_grad_(), w.clone().requires_grad_())
    gate, up = ref[0].chunk(2, dim=-1)
    y = (torch.nn.functional.silu(gate) * up) @ ref[1].t()
    ref_dh, ref_dw = torch.autograd.grad(y, ref, grad_y)
    torch.testing.assert_close(dh, ref_dh)
    torch.testing.assert_close(dw, ref_dw)


@pytest.mark.usefixtures("single_process_megatron")
def test_recomputed_swiglu_gives_the_same_loss_and_gradients():
    """model.recompute_swiglu (models/swiglu_recompute.py) changes what is kept, not the math."""
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    fp32 = dict(bf16=False)
    model, loss, grads = _loss_and_grads(_tiny(recompute_swiglu=True, **fp32), tokens)
    _, ref_loss, ref_grads = _loss_and_grads(_tiny(**fp32), tokens)
    mlp = model.decoder.layers[1].mlp
    assert isinstance(mlp, swiglu_recompute.RecomputedSwiGLUMLP)
    assert isinstance(mlp.linear_fc2, swiglu_recompute.SwiGLURowParallelLinear)  # not the fallback
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.usefixtures("single_process_megatron")
def test_recomputed_swiglu_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="plain SwiGLU"):
        build_model(_tiny(recompute_swiglu=True, activation="gelu"), meta=True)
    with pytest.raises(ConfigError, match="with model.compile_layers is not supported yet"):
        build_model(_tiny(recompute_swiglu=True, compile_layers=True), meta=True)


def _recomputed(model) -> list[bool]:
    return [
        isinstance(layer.mlp, swiglu_recompute.RecomputedSwiGLUMLP)
        for layer in model.decoder.layers
    ]


@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(), True),
        (dict(activation="gelu"), False),
        (dict(compile_layers=True), False),
        (dict(transformer_impl="local"), False),
    ],
    ids=["swiglu", "gelu", "compiled", "local-spec"],
)
def test_by_default_swiglu_is_recomputed_wherever_it_applies(kw, expected):
    """model.recompute_swiglu=None (the default): on in the torch spec's plain SwiGLU MLPs,
    silently off elsewhere (false turns it off everywhere)."""
    (model,) = build_model(_tiny(**(dict(recompute_swiglu=None) | kw)), meta=True)
    assert _recomputed(model) == [expected, expected]
    (off,) = build_model(_tiny(**kw), meta=True)  # recompute_swiglu=False
    assert _recomputed(off) == [False, False]


@pytest.mark.usefixtures("single_process_megatron")
def test_the_recomputed_mlp_builds_without_megatron_s_unknown_mlp_warning(caplog):
    """Megatron-Core's TransformerLayer warns "Unknown MLP type" for every layer whose MLP
    class is not one of its own; the recomputed MLP is MLP's subclass with MLP's arguments,
    so a run's log would carry one such line a layer for nothing. The filter drops that one
    message only: another warning of the same logger still comes through."""
    with caplog.at_level(logging.WARNING, logger="megatron.core.transformer.transformer_layer"):
        (model,) = build_model(_tiny(recompute_swiglu=True), meta=True)
        logging.getLogger("megatron.core.transformer.transformer_layer").warning("kept")
    assert _recomputed(model) == [True, True]
    assert [r.getMessage() for r in caplog.records] == ["kept"]


@pytest.mark.usefixtures("single_process_megatron")
def test_a_lora_adapter_on_the_recomputed_fc2_sees_swiglu_s_output():
    """A LoRA-wrapped fc2 runs under Megatron's own MLP forward: fc2 is then Megatron's
    linear on SwiGLU's output (the adapter's input), not SwiGLU applied a second time."""
    from megabridge.peft.lora import LoRALinear

    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    results = []
    for setting in (True, False):
        cfg = _tiny(recompute_swiglu=setting, bf16=False)
        (model,) = build_model(cfg)
        weight_init.initialize([model], cfg, seed=7)
        for layer in model.decoder.layers:
            layer.mlp.linear_fc2 = LoRALinear(layer.mlp.linear_fc2, "row", False, 4, 8.0, 0.0)
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():
                layer.mlp.linear_fc2.lora_a.copy_(torch.randn(4, 128, generator=gen) * 0.1)
                layer.mlp.linear_fc2.lora_b.copy_(torch.randn(64, 4, generator=gen) * 0.1)
        positions = torch.arange(16).expand(2, -1)
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        results.append((model, loss, {n: p.grad for n, p in model.named_parameters()}))
    (model, loss, grads), (_, ref_loss, ref_grads) = results
    assert _recomputed(model) == [True, True]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
