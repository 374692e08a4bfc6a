"""The peers that train_throughput.py times next to megabridge, on the same shape and batch.

Each ``build_*`` returns ``step(i)``: one optimizer step on one micro-batch of random tokens
[mbs, seq] (the caller times it the same way for every stack). Every peer keeps fp32
parameters, computes in bf16 under autocast and steps a fused AdamW, as each project trains
on one GPU:

* ``hf``: transformers' model of the family (sdpa attention), plain.
* ``hf-liger``: the same with Liger's kernels (RoPE, RMSNorm, SwiGLU, fused linear + cross
  entropy), what TRL and axolotl users run. Liger patches transformers' modules for the whole
  process: train_throughput.py runs it after ``hf``.
* ``torchtitan``: torchtitan's Llama 3 model, each block compiled (fullgraph), the loss
  compiled, gradient clipping, as its trainer does on one GPU (no FSDP there: autocast).
* ``torchtitan-float8`` / ``torchtitan-float8-rowwise``: the same with torchao's float8
  training on every block linear (the output layer stays bf16, as for megabridge's FP8).

The peers are optional: ``uv sync --group peers`` where the locked torch allows, or carried
wheels on the GPU box (scripts/performance/NOTES.md, "Peers").
"""

from __future__ import annotations

import sys
import types

import torch

PEERS = ("hf", "hf-liger", "torchtitan", "torchtitan-float8", "torchtitan-float8-rowwise")


def build(name: str, model_cfg, mbs: int, seq: int):
    if name not in PEERS:
        raise SystemExit(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    tokens = _tokens(model_cfg.vocab_size, mbs, seq)
    if name.startswith("hf"):
        return _build_hf(model_cfg, tokens, liger=name == "hf-liger")
    recipe = {"torchtitan": None, "torchtitan-float8": "tensorwise"}.get(name, "rowwise")
    return _build_torchtitan(model_cfg, tokens, seq, float8=recipe)


def _tokens(vocab: int, mbs: int, seq: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return torch.randint(0, vocab, (mbs, seq + 1), device="cuda", generator=gen)


def _build_hf(model_cfg, tokens: torch.Tensor, liger: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megabridge.conversion.registry import bridge_for_family

    data = bridge_for_family(model_cfg.family).hf_config_dict(model_cfg)
    model_type = data.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **data)
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config).cuda().train()
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()

    return step


def _stub_datasets() -> None:
    """torchtitan imports the ``datasets`` package at start even with no dataset in use."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        return
    stub, distributed = types.ModuleType("datasets"), types.ModuleType("datasets.distributed")
    stub.Dataset = stub.IterableDataset = stub.load_dataset = object
    distributed.split_dataset_by_node = object
    stub.distributed = distributed
    sys.modules.update({"datasets": stub, "datasets.distributed": distributed})


def torchtitan_args(model_cfg, seq: int):
    """torchtitan's TransformerModelArgs for a megabridge Llama-shaped ModelConfig."""
    _stub_datasets()
    from torchtitan.models.llama3 import TransformerModelArgs

    # torchtitan sizes the MLP as int(2/3 * 4 * dim) rounded up to multiple_of; rounding up
    # to the FFN size itself gives exactly it whenever 8/3 * dim <= ffn (Llama 3.2 1B / 3B).
    if int(8 * model_cfg.hidden_size / 3) > model_cfg.ffn_hidden_size:
        raise SystemExit("torchtitan peer: this FFN size is below 8/3 * hidden, not mapped")
    return TransformerModelArgs(
        dim=model_cfg.hidden_size,
        n_layers=model_cfg.num_layers,
        n_heads=model_cfg.num_attention_heads,
        n_kv_heads=model_cfg.num_query_groups,
        vocab_size=model_cfg.vocab_size,
        multiple_of=model_cfg.ffn_hidden_size,
        norm_eps=model_cfg.layernorm_epsilon,
        rope_theta=model_cfg.rotary_base,
        max_seq_len=seq,
    )


def _build_torchtitan(model_cfg, tokens: torch.Tensor, seq: int, float8: str | None):
    _stub_datasets()  # before the first torchtitan import
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.models.llama3 import Transformer

    with torch.device("meta"):
        model = Transformer(torchtitan_args(model_cfg, seq))
    model.to_empty(device="cuda")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cuda"))
    model.train()
    if float8 is not None:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(
            model,
            config=Float8LinearConfig.from_recipe_name(float8),
            module_filter_fn=lambda module, fqn: fqn != "output",
        )
    for layer_id, block in model.layers.named_children():  # torchtitan's apply_compile
        model.layers.register_module(layer_id, torch.compile(block, fullgraph=True))
    loss_fn = torch.compile(cross_entropy_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(inputs), labels) / labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()

    return step
