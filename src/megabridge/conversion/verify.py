"""Run transformers' model and the Megatron model on the same tokens; compare logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.errors import UserError

DEFAULT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25}
DEFAULT_MIN_TOP1 = {torch.float32: 0.99, torch.bfloat16: 0.9}


@dataclass
class VerifyResult:
    ok: bool
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float
    min_top1: float
    tokens: int
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def sample_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


@torch.no_grad()
def hf_logits(hf_path, tokens: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(hf_path), dtype=dtype, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - transformers' own loading errors
        raise UserError(f"transformers cannot load {hf_path}: {e}") from None
    model.to(device).eval()
    logits = model(input_ids=tokens.to(device)).logits.float()
    del model
    return logits


@torch.no_grad()
def megatron_logits(chunks, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage; None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)

    def collect(output, non_loss_data=False):
        return tensor_parallel.gather_from_tensor_model_parallel_region(output).float()

    def forward_step(data_iterator, model):
        next(data_iterator)
        return model(tokens, positions, None), collect

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=chunks,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    return out[0] if ps.is_pipeline_last_stage() else None


def compare(
    reference: torch.Tensor,
    logits: torch.Tensor,
    vocab_size: int,
    dtype: torch.dtype,
    atol: float | None,
    min_top1: float | None,
) -> VerifyResult:
    logits = logits[..., :vocab_size].to(reference.device)
    diff = (logits - reference).abs()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    atol = DEFAULT_ATOL.get(dtype, 0.25) if atol is None else atol
    min_top1 = DEFAULT_MIN_TOP1.get(dtype, 0.9) if min_top1 is None else min_top1
    max_diff = diff.max().item()
    return VerifyResult(
        ok=bool(max_diff <= atol and top1 >= min_top1),
        max_abs_diff=max_diff,
        mean_abs_diff=diff.mean().item(),
        top1_agreement=top1,
        atol=atol,
        min_top1=min_top1,
        tokens=reference.shape[0] * reference.shape[1],
        dtype=str(dtype).removeprefix("torch."),
    )


def _megatron_bridge(megatron_path, hf_path) -> AutoBridge:
    """The checkpoint's bridge; one that carries no model description (a foreign checkpoint)
    is described by the HF model it is compared with."""
    try:
        return AutoBridge.from_megatron_checkpoint(megatron_path)
    except UserError as e:
        if "--hf-config" not in str(e):
            raise
        return AutoBridge.from_megatron_checkpoint(megatron_path, hf_config=hf_path)


def verify(
    hf_path,
    megatron_path=None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: torch.dtype = torch.float32,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    atol: float | None = None,
    min_top1: float | None = None,
) -> VerifyResult:
    """Build the Megatron model (from ``hf_path`` or ``megatron_path``) and compare; every rank returns the result."""
    hf_bridge = AutoBridge.from_hf_pretrained(hf_path)
    bridge = _megatron_bridge(megatron_path, hf_path) if megatron_path else hf_bridge
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    provider.expert_model_parallel_size = ep
    provider.bf16 = dtype == torch.bfloat16
    if hf_bridge.model_config.vocab_size != provider.vocab_size:
        raise UserError(
            f"the Megatron checkpoint has vocab_size {provider.vocab_size}, "
            f"the HF model {hf_bridge.model_config.vocab_size}"
        )
    seq_len = min(seq_len, provider.seq_length)
    tokens = sample_tokens(provider.vocab_size, batch, seq_len, seed)
    model = bridge.to_megatron_model(provider)
    logits = megatron_logits(model, tokens)
    result = None
    if logits is not None:
        reference = hf_logits(hf_path, tokens, dtype, logits.device)
        result = compare(reference, logits, provider.vocab_size, dtype, atol, min_top1)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    return next(r for r in everyone if r is not None)
