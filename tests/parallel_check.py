"""Logits and gradients of a converted model vs transformers', on any TP layout (run by torchrun).

    python -m torch.distributed.run --nproc_per_node=2 tests/parallel_check.py \
        --hf-path DIR --tp 2 [--megatron-path CKPT]

Gradients go through the same mappings as weights (they are linear), so every
Megatron parameter's gradient shard is compared with transformers' gradients
mapped and split the same way. Prints one JSON line (rank 0). Used for layers
whose backward pass megabridge implements itself (models/torch_layers.py).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _hf_loss_and_grads(hf_path, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch.float32)
    logits = model(input_ids=tokens).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if model.config.tie_word_embeddings:
        grads.setdefault("lm_head.weight", grads["model.embed_tokens.weight"])
    return logits.detach(), grads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-path", required=True)
    p.add_argument("--megatron-path")
    p.add_argument("--tp", type=int, default=1)
    args = p.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megabridge.conversion import sharding
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import sample_tokens

    bridge = AutoBridge.from_hf_pretrained(args.hf_path)
    source = (
        AutoBridge.from_megatron_checkpoint(args.megatron_path) if args.megatron_path else bridge
    )
    cfg = source.to_megatron_provider()
    cfg.tensor_model_parallel_size, cfg.bf16 = args.tp, False
    (model,) = source.to_megatron_model(cfg)
    tokens = sample_tokens(cfg.vocab_size, 2, 32, seed=0)
    positions = torch.arange(32).expand_as(tokens)
    logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    logits = logits[..., : cfg.vocab_size]
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()

    hf_logits, hf_grads = _hf_loss_and_grads(args.hf_path, tokens)
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
        "max_abs_logit_diff": (logits.detach() - hf_logits).abs().max().item(),
        "max_rel_grad_diff": worst[0],
        "worst_grad": worst[1],
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        result = max(everyone, key=lambda r: r["max_rel_grad_diff"])
        result["max_abs_logit_diff"] = max(r["max_abs_logit_diff"] for r in everyone)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
