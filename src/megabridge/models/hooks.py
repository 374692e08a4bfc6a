"""What some families do around Megatron-Core's GPTModel, as forward hooks on the built model.

* ``embedding_multiplier``: token embeddings times a constant (Gemma: sqrt(hidden_size)).
* ``final_logit_softcap``: logits squashed to cap * tanh(logits / cap) (Gemma 2).
* ``logits_divisor``: logits divided by a constant (Granite's logits_scaling), before any cap.

GPTModel builds its embedding and output layer itself (no spec reaches them), so
these are hooks; being hooks, they work with every layer implementation. All are
elementwise, so they act on tensor- or sequence-parallel pieces unchanged, and the
training loss sees the scaled and capped logits, as in transformers.
"""

from __future__ import annotations

import functools

import torch


def apply(model: torch.nn.Module, cfg) -> None:
    embedding = getattr(model, "embedding", None)  # first pipeline stage only
    if cfg.embedding_multiplier is not None and embedding is not None:
        hook = functools.partial(_scale_embeddings, multiplier=cfg.embedding_multiplier)
        embedding.word_embeddings.register_forward_hook(hook)
    output_layer = getattr(model, "output_layer", None)  # last pipeline stage only
    # Registered first, so it runs before the soft-cap.
    if cfg.logits_divisor is not None and output_layer is not None:
        output_layer.register_forward_hook(
            functools.partial(_divide_logits, divisor=cfg.logits_divisor)
        )
    if cfg.final_logit_softcap is not None and output_layer is not None:
        output_layer.register_forward_hook(
            functools.partial(_softcap_logits, cap=cfg.final_logit_softcap)
        )


def _scale_embeddings(module, args, output: torch.Tensor, multiplier: float) -> torch.Tensor:
    # [b, s, h]. transformers keeps the multiplier as a float32 tensor and casts it to
    # the weights' dtype before multiplying (sqrt(3072) = 55.43 becomes 55.5 in bf16).
    scale = torch.tensor(multiplier, dtype=torch.float32).to(output.dtype)
    return output * scale.to(output.device)


def _softcap_logits(module, args, output, cap: float):
    logits, bias = output  # [s, b, vocab / tp]; ColumnParallelLinear returns (output, bias)
    return torch.tanh(logits / cap) * cap, bias


def _divide_logits(module, args, output, divisor: float):
    logits, bias = output  # [s, b, vocab / tp], as in _softcap_logits
    return logits / divisor, bias
