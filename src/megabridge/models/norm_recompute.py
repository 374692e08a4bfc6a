"""``model.recompute_modules=[layernorm]`` (with ``recompute_granularity=selective``) for the
torch spec: the norms before attention and MLP do not keep their outputs for backward.

The norm's output [s, b, h] is kept by the linear it feeds (QKV, fc1) for its weight gradient,
while the norm's own backward keeps its input, which is the residual stream and kept anyway.
Here the norm runs under Megatron-Core's CheckpointWithoutOutput: once attention (or the MLP)
has run, the output's storage is released, and it is recomputed from the kept input when
backward reaches that sublayer. 2 x h bf16 values per token and layer are not kept (8 KB at
h = 2048) for one norm per sublayer in backward; the math is unchanged.

Megatron-Core's own "layernorm" recompute (transformer_layer.py) does the same, but fails
without Transformer Engine in 0.16.1: its layer builds ``CheckpointWithoutOutput()``, whose
``self.fp8 = fp8 is not None`` is True for the default fp8=False, so every call reaches TE's
FP8GlobalStateManager (a NameError without TE). The torch spec therefore does it itself, with
the flag set as meant, and "layernorm" is not handed to Megatron-Core (provider).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from megatron.core.transformer.identity_op import IdentityOp

# (norm, the sublayer that consumes its output) in Megatron-Core's TransformerLayer.
_NORM_AND_CONSUMER = (("input_layernorm", "self_attention"), ("pre_mlp_layernorm", "mlp"))


class _Checkpoint(CheckpointWithoutOutput):
    """CheckpointWithoutOutput without FP8 (see the module doc for the flag it fixes)."""

    def __init__(self):
        super().__init__()
        self.fp8 = False


def recompute_norm_outputs(layer: torch.nn.Module) -> int:
    """Make ``layer``'s pre-sublayer norms release their outputs (see the module doc);
    returns how many norms do. Parameters and their names are unchanged."""
    count = 0
    for norm_name, consumer_name in _NORM_AND_CONSUMER:
        norm, consumer = getattr(layer, norm_name), getattr(layer, consumer_name)
        if isinstance(norm, IdentityOp):  # post-norm layers (OLMo 2) have none
            continue
        pending: list[_Checkpoint] = []
        # The instance's own forward: this norm, and only this one, runs checkpointed.
        norm.forward = functools.partial(_checkpointed, type(norm).forward.__get__(norm), pending)
        consumer.register_forward_hook(functools.partial(_release, pending))
        count += 1
    return count


def _checkpointed(forward, pending: list, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return forward(x)
    checkpoint = _Checkpoint()
    pending.append(checkpoint)
    return checkpoint.checkpoint(forward, x)


def _release(pending: list, module, args, output) -> None:
    """After the sublayer ran: free the norm output, recompute it when the sublayer's output
    gradient arrives (before the sublayer's own backward needs it)."""
    if pending:
        hook_tensor = output[0] if isinstance(output, tuple) else output
        pending.pop().discard_output_and_register_recompute(hook_tensor)
