"""``model.recompute_cross_entropy``: the training loss keeps the logits for backward, not an
fp32 softmax.

Megatron-Core's vocab-parallel cross entropy (fused or not) turns the logits [s, b, V] into
an fp32 copy, then in place into the softmax, and keeps that for backward: 4 bytes per token
and vocabulary entry (4.3 GB at micro-batch 16, seq 2048, vocab 32768), next to the bf16
logits while the loss is computed (2.1 GB more). Here backward keeps the logits as they came
(bf16: 2 bytes) with each row's max and sum of exponentials, and recomputes the softmax from
them with the same operations in the same order: the loss and gradients are Megatron-Core's.
On the GPU each step is one kernel, so the fp32 [s, b, V] copy never exists: where Triton
runs, the row statistics (max, sum of exponentials, the target's logit) come from one read of
the logits at TP 1 (triton_kernels.softmax_stats, an online softmax whose sum is rescaled as its max
grows: the same values to fp32 rounding) and the gradient from one more
(triton_kernels.softmax_grad); elsewhere from the compiled passes below, which read the logits
twice for the statistics.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.utils import VocabUtility

from megabridge.models import compiled, triton_kernels

log = logging.getLogger(__name__)


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().max(dim=-1)[0]  # [s, b]


def _predicted_and_sum_exp(logits, row_max, target, target_mask):
    """(logit of each target minus the row max, sum of exp(logit - max)), both [s, b] fp32."""
    shifted = logits.float() - row_max.unsqueeze(-1)
    predicted = torch.gather(shifted, -1, target.unsqueeze(-1)).squeeze(-1)
    predicted = predicted.masked_fill(target_mask, 0.0)
    return predicted, torch.exp(shifted).sum(dim=-1)


def _logits_grad(logits, row_max, sum_exp, target, target_mask, grad_loss):
    """d loss / d logits = (softmax - onehot(target)) * grad_loss, in the logits' dtype."""
    softmax = torch.exp(logits.float() - row_max.unsqueeze(-1))
    softmax = softmax / sum_exp.unsqueeze(-1)
    # The one-hot as a comparison, not a scatter: element-wise, so that the compiled kernel
    # never materialises an fp32 [s, b, V] tensor.
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = ((vocab == target.unsqueeze(-1)) & ~target_mask.unsqueeze(-1)).float()
    return ((softmax - onehot) * grad_loss.unsqueeze(-1)).to(logits.dtype)


class LogitsKeptCrossEntropy(torch.autograd.Function):
    """Per-token loss [s, b] of vocab-parallel logits [s, b, V / tp] and targets [s, b]."""

    @staticmethod
    def forward(ctx, logits, target, tp_group):
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.shape[-1], tp_group.rank(), tp_group.size()
        )
        target_mask = (target < start) | (target >= end)  # targets on another rank's slice
        # Triton's one-pass statistics at TP 1 (with TP, the max is all-reduced between passes)
        ctx.triton = (
            tp_group.size() == 1
            and triton_kernels.softmax_stats_fits(logits)
            and _kernels_agree(logits.device)
        )
        # the kernels' target is -1 where none of the row is this rank's; the compiled passes
        # take 0 there (and the mask)
        local_target = (target - start).masked_fill(target_mask, -1 if ctx.triton else 0)
        if ctx.triton:
            row_max, sum_exp, picked = triton_kernels.softmax_stats(logits, local_target)
            predicted = (picked - row_max).masked_fill(target_mask, 0.0)
        else:
            row_max = compiled.cuda_kernel(_row_max, logits)(logits)
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            predicted, sum_exp = compiled.cuda_kernel(_predicted_and_sum_exp, logits)(
                logits, row_max, local_target, target_mask
            )
        both = torch.cat((predicted, sum_exp))  # one all-reduce for the two
        dist.all_reduce(both, group=tp_group)
        predicted, sum_exp = both.chunk(2)
        ctx.save_for_backward(logits, row_max, sum_exp, local_target, target_mask)
        return torch.log(sum_exp) - predicted

    @staticmethod
    def backward(ctx, grad_loss):
        logits, row_max, sum_exp, local_target, target_mask = ctx.saved_tensors
        if ctx.triton:
            grad = triton_kernels.softmax_grad(logits, row_max, sum_exp, local_target, grad_loss)
            return grad, None, None
        grad = compiled.cuda_kernel(_logits_grad, logits)(
            logits, row_max, sum_exp, local_target, target_mask, grad_loss
        )
        return grad, None, None


@functools.cache
def _kernels_agree(device: torch.device) -> bool:
    """Whether this machine's compiled softmax kernels give the torch math on a small problem
    (checked once per device, as the interpreter's tests cannot see a GPU compiler's
    code); if not, the compiled passes run and a warning says so."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5000, generator=gen) * 4).to(device)
    target = torch.randint(0, 5000, (6,), generator=gen).to(device)
    grad_loss = torch.rand(6, generator=gen).to(device)
    row_max, sum_exp, picked = triton_kernels.softmax_stats(logits, target)
    grad = triton_kernels.softmax_grad(logits, row_max, sum_exp, target, grad_loss)
    want = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    want_grad = torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, 5000)
    agree = torch.allclose(torch.log(sum_exp) - (picked - row_max), want, rtol=1e-4, atol=1e-4)
    agree &= torch.allclose(grad, want_grad * grad_loss[:, None], rtol=1e-4, atol=1e-6)
    if not agree:
        log.warning("the Triton cross-entropy kernels disagree with torch on %s; the compiled "
                    "passes run instead", device)  # fmt: skip
    return bool(agree)


def language_model_loss(model, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """GPTModel.compute_language_model_loss through LogitsKeptCrossEntropy: labels [b, s],
    logits [s, b, V / tp] -> loss [b, s]."""
    target = labels.transpose(0, 1).contiguous()
    loss = LogitsKeptCrossEntropy.apply(logits, target, model.pg_collection.tp)
    return loss.transpose(0, 1).contiguous()


def install(model: torch.nn.Module) -> None:
    """The model (a GPTModel on the last pipeline stage) computes its loss here."""
    model.compute_language_model_loss = functools.partial(language_model_loss, model)
