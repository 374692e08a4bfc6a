"""What some families do around Megatron-Core's GPTModel, as forward hooks on the built model.

* ``embedding_multiplier``: token embeddings times a constant (Gemma: sqrt(hidden_size)).
* ``final_logit_softcap``: logits squashed to cap * tanh(logits / cap) (Gemma 2).
* ``logits_divisor``: logits divided by a constant (Granite's logits_scaling), before any cap.
* ``moe_router_group_score="max"``: group-limited routing that ranks expert groups by
  their best score (DeepSeek-V2), through the routers' top-k hook (see MaxScoreGroups).

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
    if cfg.moe_router_group_score == "max":
        for module in model.modules():
            if hasattr(module, "router_replay"):  # Megatron-Core's TopKRouter
                module.router_replay = MaxScoreGroups()
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


class MaxScoreGroups:
    """Group-limited top-k with groups ranked by their best expert score (DeepSeek-V2).

    Megatron-Core 0.16 ranks groups by the sum of their top (topk / group_topk) scores
    only; its routers take their top-k step from ``router.router_replay`` when one is
    set (moe_utils.topk_routing_with_score_function), so this object, set on each router
    of one model, changes that model's routing and nothing else.
    """

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default=None):
        # scores [tokens, experts]: softmax (or sigmoid) scores, before any scaling.
        if not group_topk:
            return torch.topk(scores, k=topk, dim=-1)
        tokens, experts = scores.shape
        best = scores.view(tokens, num_groups, -1).max(dim=-1).values  # [tokens, groups]
        chosen = torch.topk(best, k=group_topk, dim=-1, sorted=False).indices
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, chosen, True)
        keep = keep.unsqueeze(-1).expand(tokens, num_groups, experts // num_groups)
        return torch.topk(scores.masked_fill(~keep.reshape(tokens, -1), float("-inf")), k=topk)
