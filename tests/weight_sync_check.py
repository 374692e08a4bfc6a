"""Weight sync and checkpoint.save_hf under a launcher: every case in one launch.

    python -m torch.distributed.run --nproc_per_node=2 tests/weight_sync_check.py PLAN.json

PLAN.json (written by tests/functional_tests/test_weight_sync.py):

    {"cases": [{"name": "tp2", "recipe": "llama_tiny_finetune_config", "hf_dir": ...,
                "layout": {"tp": 2, "pp": 1, "ep": 1}, "dst": null, "lora": false,
                "work": ..., "errors": true}, ...]}

Per case: train 2 steps, sync into a live transformers model (on the ranks that ``dst``
names), compare its logits with the Megatron model's; 2 more steps, sync again, compare
again; then save a checkpoint with checkpoint.save_hf=true and load its HF copy
(LoRA: the peft adapter on the base) in transformers. With ``errors``: the bad
consumers (a missing name, a shape mismatch, one that raises, a stream closed early)
must give the same error on every rank, and the next sync must still work.

Rank 0 prints one ``RESULT {json}`` line per check.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from megabridge import runtime
from megabridge.conversion.verify import megatron_logits, sample_tokens
from megabridge.conversion.weight_sync import HFModelConsumer
from megabridge.errors import ConversionError
from megabridge.recipes import get_recipe
from megabridge.training import checkpointing, loop, save_hf
from megabridge.training.step import train_step

STEPS = 2


def _report(record: dict) -> None:
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(record), flush=True)


def _everyone(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _config(case: dict):
    cfg = get_recipe(case["recipe"])
    m = cfg.model
    m.tensor_model_parallel_size = case["layout"]["tp"]
    m.pipeline_model_parallel_size = case["layout"]["pp"]
    m.expert_model_parallel_size = case["layout"]["ep"]
    m.bf16 = False
    work = Path(case["work"])
    cfg.checkpoint.pretrained_checkpoint = case["hf_dir"]
    cfg.checkpoint.save, cfg.logger.log_dir = str(work / "ckpt"), str(work / "logs")
    cfg.checkpoint.save_hf = True
    cfg.dataset.type, cfg.logger.tensorboard = "mock", False
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4, 1
    cfg.train.eval_interval = None
    cfg.optimizer.lr = 1e-2  # weights that visibly move in a few steps
    cfg.scheduler.lr_decay_style = "constant"
    cfg.peft.method = "lora" if case["lora"] else "none"
    if case.get("overlap_param_gather"):  # the weights are complete only after a gather
        cfg.optimizer.use_distributed_optimizer = True
        cfg.dist.overlap_param_gather = True
    return cfg


def _train(s, steps: int) -> None:
    for _ in range(steps):
        train_step(s.cfg, s.model, s.optimizer, s.scheduler, s.train_data, s.state.consumed_samples)
        s.state.iteration += 1
        s.state.consumed_samples += s.cfg.train.global_batch_size


def _megatron_logits(s, tokens) -> torch.Tensor:
    logits = megatron_logits(s.model, tokens)
    for chunk in s.model:
        chunk.train()
    found = [x for x in _everyone(logits) if x is not None]
    return found[0][..., : s.cfg.model.vocab_size]


@torch.no_grad()
def _hf_logits(hf_model, tokens) -> torch.Tensor:
    return hf_model(input_ids=tokens).logits.float()


def _consumer_ranks(dst) -> list[int]:
    return list(range(dist.get_world_size())) if dst is None else [dst]


def sync_rounds(s, bridge, case: dict, tokens) -> dict:
    """Two rounds of (train, sync, compare); the logits must follow the training."""
    consumers = _consumer_ranks(case["dst"])
    hf = None
    if dist.get_rank() in consumers:
        hf = AutoModelForCausalLM.from_pretrained(case["hf_dir"], dtype=torch.float32).eval()
    record, previous = {}, _hf_logits(hf, tokens) if hf is not None else None
    # one plan for both rounds: what an RL loop keeps between steps
    consumer = HFModelConsumer(hf) if hf is not None else None
    plan = bridge.sync_plan(s.model, consumer, bucket_bytes=64 << 10, dst=case["dst"])
    for round_ in (1, 2):
        _train(s, STEPS)
        stats = plan.sync()
        reference = _megatron_logits(s, tokens)
        mine = None
        if hf is not None:
            got = _hf_logits(hf, tokens)
            mine = {
                "max_abs_diff": (got - reference).abs().max().item(),
                "moved": (got - previous).abs().max().item(),
                "tensors": stats["tensors"],
            }
            previous = got
        found = [(r, x) for r, x in enumerate(_everyone(mine)) if x is not None]
        record[f"sync{round_}"] = {
            "ranks": [r for r, _ in found],
            "max_abs_diff": max(x["max_abs_diff"] for _, x in found),
            "moved": min(x["moved"] for _, x in found),
            "tensors": [x["tensors"] for _, x in found],
        }
    record["reference"] = reference
    record["plan_builds"] = _everyone(plan.builds)
    return record


def saved_hf(s, case: dict, tokens, reference) -> dict:
    """checkpoint.save_hf: the HF copy of the checkpoint gives the Megatron model's logits."""
    path = loop.save(s)
    diff, files = None, None
    if dist.get_rank() == 0:
        if case["lora"]:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(case["hf_dir"], dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(path / save_hf.ADAPTER_DIR)).eval()
            folder = path / save_hf.ADAPTER_DIR
        else:
            folder = path / save_hf.HF_DIR
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        diff = (_hf_logits(model, tokens) - reference).abs().max().item()
        files = sorted(p.name for p in folder.iterdir())
    # the checkpoint with its HF copy inside is still complete and loads (a resume in a
    # fresh process, optimizer included, is what test_resilience-style runs check)
    resolved = checkpointing.resolve(path.parent) == path
    checkpointing.load(path, s.model, model_only=True)
    return {"saved_hf_max_abs_diff": diff, "saved_hf_files": files, "resumable": resolved}


def _attempt(bridge, model, consumer, dst) -> str | None:
    try:
        bridge.sync_weights(model, consumer, dst=dst)
    except ConversionError as e:
        return f"ConversionError: {e}"
    except Exception as e:  # noqa: BLE001 - reported: the check fails on it
        return f"UNEXPECTED {type(e).__name__}: {e}"
    return None


def _hf_variant(hf_dir: str, **changes):
    config = AutoConfig.from_pretrained(hf_dir)
    for key, value in changes.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class _Failing:
    """A consumer whose engine breaks mid-sync (vLLM's load_weights protocol)."""

    def load_weights(self, weights) -> None:
        raise RuntimeError("engine out of memory")


def error_cases(s, bridge, case: dict, tokens) -> dict:
    rank, hf_dir = dist.get_rank(), case["hf_dir"]
    good = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    one_layer = _hf_variant(hf_dir, num_hidden_layers=1)
    narrower = _hf_variant(hf_dir, intermediate_size=96)
    cases = {
        "missing_name_on_rank1": lambda: HFModelConsumer(one_layer if rank == 1 else good),
        "shape_mismatch_on_rank0": lambda: HFModelConsumer(narrower if rank == 0 else good),
        "raising_consumer_on_dst0": lambda: _Failing() if rank == 0 else None,
    }
    out = {}
    for name, make in cases.items():
        dst = 0 if name.endswith("dst0") else None
        out[name] = _everyone(_attempt(bridge, s.model, make(), dst))
    # a raw stream that rank 0 stops reading after two tensors, then closes
    stream = bridge.stream_hf_weights(s.model)
    taken = 0
    for _ in stream:
        taken += 1
        if rank == 0 and taken == 2:
            break
    stream.close()
    out["closed_early"] = _everyone(taken)
    # the ranks are still in step: a good sync works and matches
    bridge.sync_weights(s.model, HFModelConsumer(good))
    reference = _megatron_logits(s, tokens)
    out["after_errors_max_abs_diff"] = (_hf_logits(good, tokens) - reference).abs().max().item()
    return out


def run_case(case: dict) -> None:
    where, start = {"case": case["name"]}, time.perf_counter()
    try:
        s = loop.setup(_config(case))
        bridge = save_hf.bridge_for_run(s.cfg)
        tokens = sample_tokens(s.cfg.model.vocab_size, 2, 16, seed=0)
        record = sync_rounds(s, bridge, case, tokens)
        reference = record.pop("reference")
        record.update(saved_hf(s, case, tokens, reference))
        if case.get("errors"):
            record["errors"] = error_cases(s, bridge, case, tokens)
        _report({**where, **record, "seconds": round(time.perf_counter() - start, 1)})
    except Exception:
        _report({**where, "error": traceback.format_exc()[-3000:]})
        raise


def main() -> None:
    runtime.init_distributed()
    for case in json.loads(Path(sys.argv[1]).read_text())["cases"]:
        run_case(case)
    dist.barrier()


if __name__ == "__main__":
    main()
