"""The multi-process half of the conformance suite: every parallel check, one launch.

    python -m torch.distributed.run --nproc_per_node=2 tests/parallel_check.py PLAN.json

PLAN.json (written by tests/unit_tests/models/test_conformance.py):

    {"families": [{"family": "llama",
                   "layouts": {"tp2": {"tp": 2, "pp": 1, "ep": 1}, ...},
                   "variants": {"base": {"hf_dir": ..., "work": ...,
                                         "tp1_checkpoint": ... or null}, ...}}, ...]}

For every variant and layout: HF -> Megatron checkpoint -> HF with both conversions
at that layout (written to ``work``; the pytest side compares the bytes), and the
logits of the model loaded from that checkpoint vs transformers' in fp32. For a variant
with a ``tp1_checkpoint``: logits and gradients at TP=2 of the model loaded from it
(resharded). A vision-language variant (``"images": [paths]``, optional ``"videos": [[frame
paths]]``, optional ``"checkpoint"``: a Megatron checkpoint of it) instead: verify's logits
on those images vs transformers', and the round trip of the model built at that layout
(vision_at_layout). Starting a process and importing megatron-core costs more than all the
checks of a family, hence one launch for all of them.

Rank 0 prints ``STARTED <family>`` before a family and one line per check,
``RESULT {json}``, as soon as it is done. A check that raises prints
``RESULT {"error": ...}`` naming the check, and ends the launch: the ranks may no
longer agree on which collective comes next.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import AutoModelForCausalLM

from megabridge import runtime
from megabridge.conversion import sharding
from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.verify import (
    compare,
    hf_logits,
    megatron_logits,
    sample_tokens,
    verify,
)
from megabridge.models.config import expert_tensor_parallel_size
from megabridge.training import console

ATOL_FP32 = 1e-4


def _report(record: dict) -> None:
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(record), flush=True)


def _set_layout(cfg, layout: dict) -> None:
    """``cfg`` at ``layout``, and Megatron's parallel state rebuilt for it.

    This process checks one layout after another, so it replaces its own parallel
    state between them (AutoBridge refuses to replace a state of another layout).
    """
    cfg.tensor_model_parallel_size = layout["tp"]
    cfg.pipeline_model_parallel_size = layout["pp"]
    cfg.expert_model_parallel_size = layout["ep"]
    cfg.bf16 = False
    runtime.init_distributed()
    wanted = (layout["tp"], layout["pp"], layout["ep"], expert_tensor_parallel_size(cfg))
    existing = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    ) if ps.model_parallel_is_initialized() else None  # fmt: skip
    if existing != wanted:
        runtime.init_model_parallel(*wanted[:3], expert_tensor_parallel_size=wanted[3])


def at_layout(hf_dir: str, work: Path, layout: dict) -> dict:
    """HF -> Megatron checkpoint -> model -> HF (``work``/back), all at ``layout``; the
    loaded model's logits vs transformers'.

    Saving under a launcher builds the model from the HF folder at ``layout`` (the path
    that verify and training take), so the bytes that come back check that path too.
    """
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    cfg = bridge.to_megatron_provider()
    _set_layout(cfg, layout)
    bridge.save_megatron_checkpoint(work / "mg", cfg)
    back = AutoBridge.from_megatron_checkpoint(work / "mg")
    cfg = back.to_megatron_provider()
    _set_layout(cfg, layout)
    model = back.to_megatron_model(cfg)
    tokens = sample_tokens(cfg.vocab_size, 2, 32, seed=0)
    logits = megatron_logits(model, tokens)
    mine = None
    if logits is not None:  # the last pipeline stage
        reference = hf_logits(hf_dir, tokens, torch.float32, logits.device)
        mine = compare(reference, logits, cfg.vocab_size, torch.float32, ATOL_FP32, None)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    result = next(r for r in everyone if r is not None)
    back.save_hf_pretrained(model, work / "back")
    parameters = console.parameter_counts(
        model, layout["tp"], layout["pp"], layout["ep"], expert_tensor_parallel_size(cfg)
    )
    return {
        "parameters": parameters[0],
        "max_abs_diff": result.max_abs_diff,
        "top1_agreement": result.top1_agreement,
        "hf_dir": str(work / "back"),
    }


def vision_at_layout(
    hf_dir: str, work: Path, layout: dict, images: list, videos: list, checkpoint: str | None
) -> dict:
    """A vision-language model at ``layout``: verify's logits on ``images`` (and ``videos``)
    vs transformers' in fp32, and HF -> model -> HF (``work``/back); the tower's layers split
    over TP as the language model's. With ``checkpoint`` (a Megatron checkpoint written in
    one process): its model loaded at ``layout`` (resharded) verified too."""
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    cfg = bridge.to_megatron_provider()
    _set_layout(cfg, layout)
    result = verify(
        hf_dir, tp=layout["tp"], pp=layout["pp"], ep=layout["ep"], images=images,
        videos=videos or None,
    )  # fmt: skip
    if checkpoint:
        loaded = verify(hf_dir, checkpoint, tp=layout["tp"], pp=layout["pp"], images=images)
        result = max(result, loaded, key=lambda r: r.max_abs_diff)
    model = bridge.to_megatron_model(cfg)
    bridge.save_hf_pretrained(model, work / "back")
    split = [n for n, p in model[0].named_parameters()
             if n.startswith("vision.") and getattr(p, "tensor_model_parallel", False)]  # fmt: skip
    return {
        "max_abs_diff": result.max_abs_diff,
        "top1_agreement": result.top1_agreement,
        "hf_dir": str(work / "back"),
        "tower_split": len(split),  # the tower's tensors split over TP on this rank
    }


def _hf_loss_and_grads(hf_path, tokens):
    model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32)
    logits = model(input_ids=tokens).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        grads.setdefault("lm_head.weight", grads["model.embed_tokens.weight"])
    return logits.detach(), grads


def gradients(hf_dir: str, megatron_path: str, tp: int = 2) -> dict:
    """Logits and every parameter's gradient shard at TP=``tp`` vs transformers'.

    Gradients go through the same mappings as weights (they are linear), so each Megatron
    gradient shard is compared with transformers' gradients mapped and split the same way.
    Used for layers whose backward pass megabridge implements itself (models/torch_layers.py).
    """
    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    source = AutoBridge.from_megatron_checkpoint(megatron_path)
    cfg = source.to_megatron_provider()
    _set_layout(cfg, {"tp": tp, "pp": 1, "ep": 1})
    (model,) = source.to_megatron_model(cfg)
    tokens = sample_tokens(cfg.vocab_size, 2, 32, seed=0)
    positions = torch.arange(32).expand_as(tokens)
    out = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    out = out[..., : cfg.vocab_size]
    F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()

    hf_logits, hf_grads = _hf_loss_and_grads(hf_dir, tokens)
    group = ps.get_tensor_model_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    worst = (0.0, "")
    for local_name, param in model.named_parameters():
        name = sharding.global_name(model, local_name)
        how = sharding.param_split(local_name, param, cfg.gated)
        grad = param.grad
        if cfg.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name):
            grad = grad.clone()  # as Megatron's finalize_model_grads: summed over TP ranks
            dist.all_reduce(grad, group=group)
        mapping, hf_names = bridge.family.resolve(name)
        full = mapping.hf_to_megatron([hf_grads[n] for n in hf_names], cfg)
        expected = sharding.split(full, how, rank, size)
        scale = expected.abs().max().item() + 1e-12
        worst = max(worst, ((grad - expected).abs().max().item() / scale, name))
    mine = {
        "max_abs_diff": (out.detach() - hf_logits).abs().max().item(),
        "max_rel_grad_diff": worst[0],
        "worst_grad": worst[1],
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    result = max(everyone, key=lambda r: r["max_rel_grad_diff"])
    result["max_abs_diff"] = max(r["max_abs_diff"] for r in everyone)
    return result


def run(plan: dict) -> None:
    for family in plan["families"]:
        if dist.get_rank() == 0:
            print(f"STARTED {family['family']}", flush=True)
        run_family(family)


def run_family(plan: dict) -> None:
    for variant, case in plan["variants"].items():
        if "images" in case:
            visual = (case["images"], case.get("videos", []), case.get("checkpoint"))
            checks = [(name, vision_at_layout, (case["hf_dir"], Path(case["work"]) / name,
                                                layout, *visual))
                      for name, layout in plan["layouts"].items()]  # fmt: skip
        else:
            checks = [(name, at_layout, (case["hf_dir"], Path(case["work"]) / name, layout))
                      for name, layout in plan["layouts"].items()]  # fmt: skip
        if case.get("tp1_checkpoint"):
            checks.append(("gradients_tp2", gradients, (case["hf_dir"], case["tp1_checkpoint"])))
        for check, fn, args in checks:
            where = {"family": plan["family"], "variant": variant, "check": check}
            start = time.perf_counter()
            try:
                record = fn(*args)
                _report({**where, **record, "seconds": round(time.perf_counter() - start, 2)})
            except Exception:
                _report({**where, "error": traceback.format_exc()[-3000:]})
                raise


def main() -> None:
    runtime.init_distributed()
    run(json.loads(Path(sys.argv[1]).read_text()))
    dist.barrier()


if __name__ == "__main__":
    main()
