"""Megatron-Bridge's own checkpoint loader, run on a `convert hf-to-megatron --megatron-layout`
output (the companion of megatron_lm_load_check.py).

Megatron-Bridge 0.6.2 needs Python 3.12 and transformers <= 5.12.1, which megabridge's
environment does not have, so it runs in a throw-away environment of its own (README,
"Checkpoints from Megatron-LM, Megatron-Bridge and NeMo 2", has the commands that make it):

    uv run python scripts/megatron_bridge_load_check.py --python /tmp/mbenv/bin/python

In megabridge's environment: a tiny random fp32 Llama (or ``--hf-path``) is converted with
``megabridge convert hf-to-megatron --megatron-layout`` and transformers' logits are taken
on fixed tokens. Then this script runs again under ``--python`` (``--child``), where
Megatron-Bridge's code, unchanged, does what ``checkpoint.pretrained_checkpoint=OUT`` does:
``_resolve_checkpoint_iteration`` (its tracker, latest_train_state.pt), ``load_model_config``
(run_config.yaml instantiated into its model provider), ``build_and_load_model`` (the model
from that provider, the dist checkpoint loaded strictly into it). The loaded model's logits
are compared with transformers'. One PASS / FAIL line per step; exit code 1 on a FAIL.

What the child changes, and why (nothing of it touches the checkpoint or the loader):
* ``megatron.bridge.peft.lora_layers`` is replaced by a stand-in module before the import:
  it imports Transformer Engine unconditionally (LoRA layers; not used by a load), and a
  stand-in for TE itself would make Megatron-Core believe TE is installed.
* the provider's layer spec is Megatron-Core's local spec when TE is not installed (its
  default asks for TE); the local spec maps its parameter names to TE's in the checkpoint
  (``sharded_state_dict_keys_map``), so the keys read are the same.
* megabridge's CPU backend (runtime.enable_cpu_backend) when no GPU is visible:
  Megatron-Core puts rotary frequencies on ``cuda`` even for a CPU model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the child (Megatron-Bridge)


def _stand_in_lora_layers() -> None:
    """See the module docstring: LoRA layers that refuse to be built, no TE import."""

    def refuse(self, *args, **kwargs):
        raise RuntimeError("megatron_bridge_load_check: LoRA layers are not available here")

    module = types.ModuleType("megatron.bridge.peft.lora_layers")
    for name in ("LinearAdapter", "LoRALinear", "LoRATopKRouter", "TEFusedLoRALinear"):
        setattr(module, name, type(name, (), {"__init__": refuse}))
    sys.modules[module.__name__] = module


def child(root: Path, tokens_path: Path, out_path: Path) -> None:
    import importlib.util

    have_te = importlib.util.find_spec("transformer_engine") is not None
    if not have_te:
        _stand_in_lora_layers()
    if not torch.cuda.is_available():
        sys.path.insert(0, str(REPO / "src"))
        from megabridge import runtime  # torch and megatron-core only

        runtime.enable_cpu_backend()
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.bridge.training.checkpointing import _resolve_checkpoint_iteration
    from megatron.bridge.training.model_load_save import (
        build_and_load_model,
        load_model_config,
        temporary_distributed_context,
    )
    from megatron.bridge.training.utils.checkpoint_utils import get_checkpoint_name

    iteration, release = _resolve_checkpoint_iteration(str(root), None)
    ckpt = get_checkpoint_name(str(root), iteration, release)
    provider, mlm_args = load_model_config(ckpt)
    if not have_te:
        provider.transformer_layer_spec = local_layer_spec
    provider.perform_initialization = False  # as its load_megatron_model: weights come next
    tokens = torch.load(tokens_path)
    with temporary_distributed_context("gloo"):
        # its context seeds the RNG tracker only when CUDA is there (CPU: megabridge's backend)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        (model,) = build_and_load_model(
            ckpt, provider, use_cpu_init=True, skip_temp_dist_context=True
        )
        model.eval()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            logits = model(tokens, positions, None)
    torch.save(
        {
            "iteration": iteration,
            "checkpoint": ckpt,
            "provider": f"{type(provider).__module__}.{type(provider).__name__}",
            "mlm_args": mlm_args is not None,
            "layers": provider.num_layers,
            "logits": logits.float(),
        },
        out_path,
    )


# ---------------------------------------------------------------- the parent (megabridge)


def parent(opts) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    from megatron_lm_load_check import MODEL, convert_with_megatron_layout, make_tiny_llama, report

    from megabridge.conversion import verify

    work = opts.workdir or Path(tempfile.mkdtemp(prefix="mb-load-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = opts.hf_path or make_tiny_llama(work / "hf")
    ckpt = work / "megatron-layout"
    convert_with_megatron_layout(hf, ckpt)
    vocab = MODEL["vocab_size"] if opts.hf_path is None else verify_vocab(hf)
    tokens = verify.sample_tokens(vocab, 2, 16, seed=0)
    torch.save(tokens, work / "tokens.pt")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ""}
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run(
        [str(opts.python), __file__, "--child", str(ckpt), str(work / "tokens.pt"),
         str(work / "theirs.pt")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if not report(run.returncode == 0, f"Megatron-Bridge loaded {ckpt} ({opts.python})"):
        print(run.stdout[-3000:], run.stderr[-6000:], sep="\n")
        return 1
    theirs = torch.load(work / "theirs.pt")
    ok = report(
        theirs["iteration"] == 0 and Path(theirs["checkpoint"]).name == "iter_0000000",
        f"its tracker (latest_train_state.pt) named iteration {theirs['iteration']}: "
        f"{theirs['checkpoint']}",
    )
    ok &= report(
        not theirs["mlm_args"] and theirs["layers"] == verify_layers(hf),
        f"run_config.yaml instantiated {theirs['provider']} ({theirs['layers']} layers)",
    )
    reference = verify.hf_logits(hf, tokens, torch.float32, torch.device("cpu"))
    logits = theirs["logits"][..., :vocab]
    diff = (logits - reference).abs().max().item()
    ok &= report(
        diff < 1e-4, f"Megatron-Bridge's loaded model vs transformers: max |logit diff| {diff:.2e}"
    )
    return 0 if ok else 1


def verify_vocab(hf: Path) -> int:
    import json

    return json.loads((hf / "config.json").read_text())["vocab_size"]


def verify_layers(hf: Path) -> int:
    import json

    return json.loads((hf / "config.json").read_text())["num_hidden_layers"]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--python", type=Path, help="the Python of the Megatron-Bridge environment")
    p.add_argument("--hf-path", type=Path, help="an HF Llama folder (default: a tiny random one)")
    p.add_argument("--workdir", type=Path, help="where the checkpoint goes (default: a temp dir)")
    p.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        child(*opts.child)
        return 0
    if opts.python is None or not opts.python.is_file():
        sys.exit(f"--python {opts.python}: the Megatron-Bridge environment's python is needed")
    return parent(opts)


if __name__ == "__main__":
    sys.exit(main())
