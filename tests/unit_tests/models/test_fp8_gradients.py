"""FP8 gradients against float64 (models/fp8.py): the error is FP8's rounding and no more.

The reference is the same tiny model in float64. The yardstick is simulated FP8: the same
quantisation (models/fp8.quantize), then the product in float32 (``emulate``), which is what
FP8's precision predicts with no GEMM kernel involved. The real path (torch._scaled_mm: on
the CPU its reference kernel, on a GPU cuBLAS's FP8 GEMM behind the compiled casts) and
the compiled layers (``model.compile_layers``, inductor) must carry no more error than the
simulation. A wrong layout, a scale on the wrong axis or a mis-scaled gradient shows here
as an error several times FP8's (an H200 showed 0.36 in the embedding's gradient once,
against the 0.04 measured here). The GPU smoke suite runs this file with a GPU.
"""

import pytest
import torch

from megabridge.models import compiled, fp8
from megabridge.models import init as weight_init
from megabridge.models.config import ModelConfig
from megabridge.models.provider import build_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where build_model puts the model
# The parameters whose gradients pass through FP8 GEMMs (every block linear, and the
# embedding, whose gradient is the residual stream's after both layers' backward).
CHECKED = ("embedding.word_embeddings.weight",) + tuple(
    f"decoder.layers.{i}.{name}.weight"
    for i in range(2)
    for name in (
        "self_attention.linear_qkv",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    )  # fmt: skip
)


_FP8_LINEAR = fp8.fp8_linear  # before any test swaps it


def _tiny(**kw) -> ModelConfig:
    kw = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, vocab_size=128, seq_length=32, bf16=True,
              transformer_impl="torch") | kw  # fmt: skip
    return ModelConfig(**kw)


def _grads(cfg: ModelConfig, backend: str | None = None, double: bool = False) -> dict:
    """Every parameter's gradient (float64) of the mean loss on one fixed batch."""
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    if double:
        model.double()
    if backend is not None:
        assert compiled.compile_layers(model, backend=backend) == cfg.num_layers
    device = next(model.parameters()).device
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    positions = torch.arange(16, device=device).expand(2, -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).double().mean()
    loss.backward()
    return {n: p.grad.double().cpu() for n, p in model.named_parameters()}


def _errors(grads: dict, reference: dict) -> dict:
    return {n: ((grads[n] - reference[n]).norm() / reference[n].norm()).item() for n in CHECKED}


@pytest.fixture(scope="module")
def fp64_reference():
    """The tiny model's gradients in float64."""
    return _grads(_tiny(bf16=False), double=True)


@pytest.fixture
def fp8_anywhere(monkeypatch):
    """FP8 builds on the CPU too: torch._scaled_mm has a CPU kernel."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(fp8, "check_fp8_supported", lambda *a: None)


def _use_gemm(monkeypatch, emulate: bool) -> None:
    """Run the block linears' GEMMs simulated (float32) or through torch._scaled_mm, on any
    device (the layers pick by device: emulated on the CPU, _scaled_mm on a GPU)."""
    linear = _FP8_LINEAR
    monkeypatch.setattr(fp8, "fp8_linear", lambda x, w, r, **_: linear(x, w, r, emulate))
    if not torch.cuda.is_available():  # eager casts on the CPU: no C++ compile in this test
        monkeypatch.setattr(fp8, "_quantize_fn", lambda emulate: fp8.quantize)


def _assert_within_fp8_rounding(errors: dict, simulated: dict, what: str) -> None:
    for name in CHECKED:
        # 1.25x + 0.01: another rounding of the same precision (compiled code keeps some
        # bf16 intermediates in float32, so a few elements round the other way) moves the
        # error by ~10%; a wrong layout or scale moves it several-fold.
        assert errors[name] <= 1.25 * simulated[name] + 0.01, (
            f"{what}, {name}: error {errors[name]:.3f} against simulated FP8's {simulated[name]:.3f}"
        )


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_eager_fp8_gradients_carry_fp8_rounding_and_no_more(
    fp8_anywhere, fp64_reference, monkeypatch, recipe
):
    bf16 = _errors(_grads(_tiny()), fp64_reference)
    _use_gemm(monkeypatch, emulate=True)
    simulated = _errors(_grads(_tiny(fp8=recipe)), fp64_reference)
    if torch.cuda.is_available():  # the compiled (Triton) casts alone, GEMMs still simulated
        quantize_fn = fp8._quantize_fn
        monkeypatch.setattr(fp8, "_quantize_fn", lambda emulate: quantize_fn(False))
        casts = _errors(_grads(_tiny(fp8=recipe)), fp64_reference)
        monkeypatch.setattr(fp8, "_quantize_fn", quantize_fn)
        _assert_within_fp8_rounding(casts, simulated, f"compiled casts, {recipe}")
    _use_gemm(monkeypatch, emulate=False)
    calls = _record_scaled_mm_layouts(monkeypatch, compiled_code=False)
    real = _errors(_grads(_tiny(fp8=recipe)), fp64_reference)
    _assert_scaled_mm_layouts(calls)
    # FP8's precision: e4m3 keeps 3 mantissa bits, e5m2 2 (bf16 7): a relative error of a few
    # percent per GEMM, compounding through two layers (measured: embedding 0.03-0.04,
    # block linears 0.06-0.10; bf16 0.005-0.008).
    for name in CHECKED:
        assert 2 * bf16[name] < simulated[name] < 0.15, (name, simulated[name], bf16[name])
    _assert_within_fp8_rounding(real, simulated, f"eager {recipe}")


def _record_scaled_mm_layouts(monkeypatch, compiled_code: bool = True) -> list:
    """What torch._scaled_mm is handed: (left operand's strides, right's) per call, from
    compiled code (inductor's extern kernel) or from eager code (torch._scaled_mm)."""
    from torch._inductor.select_algorithm import extern_kernels

    where = extern_kernels if compiled_code else torch
    calls, real = [], where._scaled_mm

    def recording(a, b, *args, **kwargs):
        calls.append((a.stride(), b.stride()))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(where, "_scaled_mm", recording)
    return calls


def _assert_scaled_mm_layouts(calls: list) -> None:
    # 2 layers x 4 block linears x 3 GEMMs (forward, input gradient, weight gradient), each
    # with torch._scaled_mm's contract (cuBLAS's; the CPU kernel takes any layout): left
    # operand row-major, right one column-major.
    assert len(calls) == 2 * 4 * 3
    for a_stride, b_stride in calls:
        assert a_stride[1] == 1 and b_stride[0] == 1, (a_stride, b_stride)


# Not in CI: inductor's C++ compile of a layer took 97 s cold on the 2-core machine (the
# GPU smoke's fp8_gradients path runs it, both recipes; the fused linear below runs in CI).
@pytest.mark.skipduringci
@pytest.mark.parametrize("recipe", fp8.RECIPES if torch.cuda.is_available() else ["tensorwise"])
def test_compiled_fp8_layers_carry_fp8_rounding_and_no_more(
    fp8_anywhere, fp64_reference, monkeypatch, recipe
):
    """model.compile_layers with model.fp8: inductor compiles the casts and lays out the GEMMs'
    operands; the gradients must be as close to float64 as simulated FP8's (as eager FP8's)."""
    _use_gemm(monkeypatch, emulate=True)
    simulated = _errors(_grads(_tiny(fp8=recipe)), fp64_reference)
    _use_gemm(monkeypatch, emulate=False)
    calls = _record_scaled_mm_layouts(monkeypatch)
    torch._dynamo.reset()
    compiled_errors = _errors(_grads(_tiny(fp8=recipe), backend="inductor"), fp64_reference)
    _assert_scaled_mm_layouts(calls)
    _assert_within_fp8_rounding(compiled_errors, simulated, f"compiled {recipe}")


# On the CPU, tensorwise only: each recipe is one inductor C++ compile (8-33 s on 2 cores),
# and the layouts checked are the same. On the H200 (torch 2.11) both recipes' gradients come
# out zero, with inductor and with dynamo alone (backend="eager"; fp8_inductor_probe.py), so
# model.compile_layers with model.fp8 is refused; strict: a torch that fixes it fails here,
# and the refusal can go.
@pytest.mark.xfail(
    torch.cuda.is_available(),
    strict=True,
    reason="compiled FP8 linears get zero gradients on CUDA (H200, torch 2.11)",
)
@pytest.mark.parametrize("recipe", fp8.RECIPES if torch.cuda.is_available() else ["tensorwise"])
def test_a_compiled_fp8_linear_between_element_wise_ops_matches_eager(
    fp8_anywhere, monkeypatch, recipe
):
    """The compiled layers' situation in small (in CI): inductor fuses the casts with the
    element-wise work around the FP8 linear and lays out the operands; the GEMMs must get
    torch._scaled_mm's layouts and the gradients must match eager's."""
    _use_gemm(monkeypatch, emulate=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(48, 32, generator=gen) * 0.1).to(DEVICE, torch.bfloat16)
    grad_y = torch.randn(64, 48, generator=gen).to(DEVICE, torch.bfloat16)

    def block(x, w):  # an RMSNorm-like scaling before, SiLU after, as in a layer
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
        return torch.nn.functional.silu(fp8.fp8_linear(h, w, recipe))

    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    block(xe, we).backward(grad_y)
    calls = _record_scaled_mm_layouts(monkeypatch)
    torch._dynamo.reset()
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.compile(block, backend="inductor", dynamic=False)(xc, wc).backward(grad_y)
    # forward, input gradient, weight gradient; each left row-major, right column-major
    assert len(calls) == 3 and all(a[1] == 1 and b[0] == 1 for a, b in calls), calls
    for eager, compiled_ in ((xe.grad, xc.grad), (we.grad, wc.grad)):
        diff = ((compiled_.float() - eager.float()).norm() / eager.float().norm()).item()
        # measured 0.02-0.03: compiled code keeps the scaled input in float32 where eager rounds
        # it to bf16, so a few FP8 roundings go the other way; a wrong layout gives ~1
        assert diff < 0.1
