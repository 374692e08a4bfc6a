"""``model.compile_layers``: each transformer layer of the torch spec compiled as one graph.

torch.compile (inductor) can then fuse the element-wise work between the GEMMs (norms,
RoPE, SwiGLU, residual adds) and choose what backward keeps or recomputes. Each layer is
compiled in place (``nn.Module.compile``): parameter names, checkpoints and hooks are
unchanged. Layers of one structure share one compiled graph (their parameters are the
graph's inputs), so a 16-layer model compiles once, not 16 times.

Measured on an H200 (1.1B Llama shape, micro-batch 16; scripts/performance/NOTES.md): the
same tokens/s and peak memory as the eager layers, whose element-wise pieces are compiled
one by one already, and a loss within 0.7% of eager's over 60 steps of real text. Not
with ``model.fp8`` yet: refused, because the compiled FP8 layers trained wrongly there.

A layer compiles as one graph only if nothing in it breaks dynamo's trace;
``graph_breaks`` counts the breaks for a sample call (the tests hold it at zero for the
torch spec). ``RowParallelLinear`` below removes the one break Megatron-Core 0.16 has.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear as MegatronRowParallelLinear

from megabridge.errors import ConfigError


class RowParallelLinear(MegatronRowParallelLinear):
    """Megatron-Core's row-parallel linear, handing its own TP group to the GEMM.

    Megatron-Core 0.16's RowParallelLinear.forward passes ``tp_group=None`` to its
    linear function, which then looks the group up and calls warnings.warn (a
    deprecation notice) on every call: a graph break in a compiled layer. The group
    is not used there (no input-gradient all-reduce, no sequence parallel in a row
    linear's GEMM); passing the layer's own avoids the lookup.
    """

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def check_compile_supported(impl: str, fp8_recipe: str | None) -> None:
    if impl != "torch":
        raise ConfigError(
            f"model.compile_layers is built for the torch layer spec only, not {impl}; "
            "set model.transformer_impl=torch"
        )
    if fp8_recipe is not None:
        # Measured on an H200 (torch 2.11): compiled FP8 layers trained wrongly (loss 9.22
        # against bf16's 6.34 after 60 steps), while eager FP8 layers tracked bf16; a compiled
        # FP8 linear's gradients come out zero there, with dynamo alone too
        # (scripts/performance/fp8_inductor_probe.py). On the CPU (torch 2.15, inductor,
        # torch._scaled_mm's CPU kernel) their gradients are within FP8's rounding of float64
        # (tests/unit_tests/models/test_fp8_gradients.py); lifted once that file passes on a
        # GPU and fp8_loss_curve.py --measure-compiled-fp8 tracks bf16.
        raise ConfigError("model.compile_layers with model.fp8 is not supported yet")


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer layer of ``model`` in place; returns how many."""
    layers = list(model.decoder.layers) if getattr(model, "decoder", None) is not None else []
    for layer in layers:
        # dynamic=None: automatic dynamic shapes, so packed batches of new lengths
        # recompile once into a shape-generic graph, not once per length.
        layer.compile(backend=backend, dynamic=None)
    return len(layers)


def graph_breaks(layer: torch.nn.Module, *args, **kwargs) -> list[str]:
    """Why dynamo would split ``layer``'s forward for this call (empty: one graph)."""
    explained = torch._dynamo.explain(layer.forward)(*args, **kwargs)
    return [reason.reason.splitlines()[0] for reason in explained.break_reasons]


_kernels: dict = {}


def cuda_kernel(fn, like: torch.Tensor):
    """fn as one compiled kernel on the GPU; eager on the CPU (tests: exact numerics). The
    element-wise passes of the logits-keeping cross entropy (cross_entropy.py) run through
    it."""
    if not like.is_cuda:
        return fn
    if fn not in _kernels:
        _kernels[fn] = torch.compile(fn, dynamic=None)
    return _kernels[fn]
