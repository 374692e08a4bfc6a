"""model.fp8's gradient error, piece by piece, against the same tiny model in float64.

    python scripts/performance/fp8_grad_error.py [--recipes tensorwise rowwise] [--no-compile]

One table: for bf16 and for each FP8 path, the relative error of the embedding's and the
block linears' gradients (the tiny model of tests/unit_tests/models/test_fp8_gradients.py,
on a GPU if torch sees one). The FP8 rows take the pieces apart: the casts eager or
compiled (models/fp8._quantize_fn: the compiled cast, as training runs them), the GEMM simulated
in float32 or torch._scaled_mm, and the whole layer compiled (aot_eager: dynamo's trace
only; inductor: model.compile_layers). Simulated FP8 (eager casts, float32 GEMM) is what
FP8's precision predicts; a row well above it names the piece that goes wrong.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from megabridge import runtime
from megabridge.models import compiled, fp8
from megabridge.models import init as weight_init
from megabridge.models.config import ModelConfig
from megabridge.models.provider import build_model

NAMES = {
    "embedding.word_embeddings.weight": "embedding",
    "decoder.layers.0.self_attention.linear_qkv.weight": "L0 qkv",
    "decoder.layers.0.self_attention.linear_proj.weight": "L0 proj",
    "decoder.layers.0.mlp.linear_fc1.weight": "L0 fc1",
    "decoder.layers.0.mlp.linear_fc2.weight": "L0 fc2",
    "decoder.layers.1.mlp.linear_fc1.weight": "L1 fc1",
    "output_layer.weight": "output",
}


def tiny(**kw) -> ModelConfig:
    kw = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, vocab_size=128, seq_length=32, bf16=True,
              transformer_impl="torch") | kw  # fmt: skip
    return ModelConfig(**kw)


def grads(cfg: ModelConfig, backend: str | None = None, double: bool = False) -> dict:
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=7)
    if double:
        model.double()
    if backend is not None:
        torch._dynamo.reset()
        compiled.compile_layers(model, backend=backend)
    device = next(model.parameters()).device
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    positions = torch.arange(16, device=device).expand(2, -1)
    model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).double().mean().backward()
    return {n: p.grad.double().cpu() for n, p in model.named_parameters() if n in NAMES}


@contextlib.contextmanager
def fp8_pieces(casts: str, gemm: str):
    """The block linears with these casts ("eager" / "compiled") and GEMM ("fp32" /
    "scaled_mm"), whatever the device (training picks: a GPU compiled + scaled_mm)."""
    saved = fp8.fp8_linear, fp8._quantize_fn, fp8.check_fp8_supported
    linear, emulate = fp8.fp8_linear, gemm == "fp32"
    fp8._compiled.clear()
    quantize = fp8.quantize if casts == "eager" else fp8._quantize_fn(False)
    fp8.fp8_linear = lambda x, w, r, **_: linear(x, w, r, emulate)
    fp8._quantize_fn = lambda _emulate: quantize
    fp8.check_fp8_supported = lambda *a: None  # the CPU's _scaled_mm kernel runs FP8 too
    try:
        yield
    finally:
        fp8.fp8_linear, fp8._quantize_fn, fp8.check_fp8_supported = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(fp8.RECIPES), choices=fp8.RECIPES)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled-layer rows")
    args = p.parse_args()
    runtime.init_distributed()
    runtime.init_model_parallel(1, 1)
    runtime.seed_everything(1234)  # Megatron's RNG tracker, which building the model forks
    reference = grads(tiny(bf16=False), double=True)
    rows = {"bf16": grads(tiny())}
    for recipe in args.recipes:
        for casts, gemm in (("eager", "fp32"), ("compiled", "fp32"), ("eager", "scaled_mm"),
                            ("compiled", "scaled_mm")):  # fmt: skip
            with fp8_pieces(casts, gemm):
                rows[f"{recipe}, {casts} casts, {gemm}"] = grads(tiny(fp8=recipe))
        for backend in () if args.no_compile else ("aot_eager", "inductor"):
            with fp8_pieces("eager", "scaled_mm"):
                rows[f"{recipe}, layers {backend}"] = grads(tiny(fp8=recipe), backend)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nrelative gradient error against float64 ({device}, torch {torch.__version__})")
    print(f"{'':40s}" + "".join(f"{short:>10s}" for short in NAMES.values()))
    for label, g in rows.items():
        errors = [((g[n] - reference[n]).norm() / reference[n].norm()).item() for n in NAMES]
        print(f"{label:40s}" + "".join(f"{e:10.3f}" for e in errors))


if __name__ == "__main__":
    main()
