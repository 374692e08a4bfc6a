"""model.compile_layers (models/compiled.py): each torch-spec layer compiles as one graph and
computes what the eager layer computes. On the CPU through aot_eager (dynamo's trace and
AOTAutograd's forward/backward split, no code generation: bit-equal); where torch sees a
GPU (the GPU smoke suite runs this file with one) through inductor, bf16 and FP8."""

import pytest
import torch

from megabridge.errors import ConfigError
from megabridge.models import compiled, fp8
from megabridge.models import init as weight_init
from megabridge.models.config import ModelConfig
from megabridge.models.provider import build_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_process_megatron")]

# (backend, model options, loss tolerance, relative gradient tolerance), each against the
# eager model with the same options: bit-equal through aot_eager on the CPU, close through
# inductor on a GPU.
if torch.cuda.is_available():
    CASES = [("inductor", dict(bf16=True), 2e-3, 0.05)]
else:
    CASES = [
        ("aot_eager", dict(bf16=False), 0.0, 0.0),
        ("aot_eager", dict(bf16=False, qk_layernorm=True, add_qkv_bias=True), 0.0, 0.0),
    ]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where build_model puts the model


def _tiny(**kw) -> ModelConfig:
    kw = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, vocab_size=128, seq_length=32,
              transformer_impl="torch") | kw  # fmt: skip
    return ModelConfig(**kw)


def _batch(device: str):
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    positions = torch.arange(16, device=device).expand(2, -1)
    return tokens[:, :-1], positions, tokens[:, 1:]


def _loss_and_grads(cfg: ModelConfig, device: str, backend: str | None):
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    if backend is not None:
        assert compiled.compile_layers(model, backend=backend) == cfg.num_layers
    inputs, positions, labels = _batch(device)
    loss = model(inputs, positions, None, labels=labels).float().mean()
    loss.backward()
    return model, loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _first_layer_call(model, device: str):
    """The (args, kwargs) the model hands its first layer."""
    seen = {}
    hook = model.decoder.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True
    )
    inputs, positions, labels = _batch(device)
    with torch.no_grad():
        model(inputs, positions, None, labels=labels)
    hook.remove()
    return seen["args"], seen["kwargs"]


@pytest.fixture
def fp8_anywhere(monkeypatch):
    """FP8 builds on the CPU too (its GEMMs emulated)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(fp8, "check_fp8_supported", lambda *a: None)


def _case_id(case) -> str:
    backend, options = case[0], case[1]
    return "-".join([backend, "bf16" if options["bf16"] else "fp32", *sorted(options)[1:]])


@pytest.mark.parametrize(
    ("backend", "options", "loss_tol", "grad_tol"), CASES, ids=map(_case_id, CASES)
)
def test_compiled_layers_give_the_eager_loss_and_gradients(backend, options, loss_tol, grad_tol):
    torch._dynamo.reset()
    model, loss, grads = _loss_and_grads(_tiny(**options), DEVICE, backend)
    _, ref_loss, ref_grads = _loss_and_grads(_tiny(**options), DEVICE, None)
    assert all(hasattr(layer, "_compiled_call_impl") for layer in model.decoder.layers)
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        # every weight is trained: a compiled layer must not cut the backward short
        assert grad is not None and grad.abs().sum() > 0, name
        ref = ref_grads[name].float()
        rel = ((grad.float() - ref).norm() / ref.norm()).item()
        assert rel <= grad_tol, f"{name}: relative difference {rel:.3g}"


@pytest.mark.parametrize("options", [dict(), dict(fp8="tensorwise"), dict(qk_layernorm=True)])
def test_a_torch_spec_layer_traces_as_one_graph(fp8_anywhere, options):
    """No graph breaks: the whole layer (norms, attention, MLP, residual adds) is one graph."""
    (model,) = build_model(_tiny(bf16=True, **options))
    args, kwargs = _first_layer_call(model, DEVICE)
    assert compiled.graph_breaks(model.decoder.layers[0], *args, **kwargs) == []


def test_the_row_parallel_linears_are_ours():
    """Megatron-Core's RowParallelLinear looks its group up and warns on every call: a graph
    break. The torch spec builds the subclass that hands its group down."""
    from megabridge.models.swiglu_recompute import SwiGLURowParallelLinear

    for recompute, fc2 in ((False, compiled.RowParallelLinear), (None, SwiGLURowParallelLinear)):
        (model,) = build_model(_tiny(recompute_swiglu=recompute), meta=True)
        layer = model.decoder.layers[0]
        assert type(layer.self_attention.linear_proj) is compiled.RowParallelLinear
        assert type(layer.mlp.linear_fc2) is fc2  # model.recompute_swiglu's fc2 builds on ours
        assert isinstance(layer.mlp.linear_fc2, compiled.RowParallelLinear)


def test_compile_layers_is_refused_off_the_torch_spec_and_with_fp8():
    with pytest.raises(ConfigError, match="compile_layers is built for the torch layer spec"):
        build_model(_tiny(compile_layers=True, transformer_impl="local"), meta=True)
    with pytest.raises(ConfigError, match="compile_layers with model.fp8 is not supported yet"):
        build_model(_tiny(compile_layers=True, fp8="tensorwise"), meta=True)
