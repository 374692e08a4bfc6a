"""Convert a random HF model of a released shape (its layers cut to fit) both ways.

The shape is one of the SIZES tables of models/<family>/recipes.py (the released
config.json fields), with num_hidden_layers cut to --layers (MoE families keep at least
one MoE layer). transformers builds the model with random weights in bf16 and saves it
in 2 GB shards; then `megabridge convert hf-to-megatron` and `megatron-to-hf` run as
separate processes, each timed, with the peak proportional set size (PSS) of its
process tree (conversion_speed.measure). The exported folder must hold the same
tensors, bit for bit.

    uv run python scripts/performance/convert_real_shape.py --size qwen25_7b --layers 4
    uv run python scripts/performance/convert_real_shape.py --size glm45_air --layers 2
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from conversion_speed import measure  # noqa: E402  (a sibling script, not a package)

GIB = 2**30


def find_size(size: str):
    """(bridge, HF fields) of the size named ``size`` in some family's SIZES table."""
    from megabridge.conversion.registry import bridges

    for bridge in {b.family: b for b in bridges().values()}.values():
        table = importlib.import_module(f"megabridge.models.{bridge.family}.recipes").SIZES
        if size in table:
            return bridge, copy.deepcopy(table[size])
    sys.exit(f"no family has a size {size!r} in its recipes.py SIZES table")


def cut_layers(fields: dict, layers: int) -> dict:
    """The release's fields with ``layers`` layers; MoE keeps at least one MoE layer."""
    fields["num_hidden_layers"] = layers
    if "first_k_dense_replace" in fields:
        fields["first_k_dense_replace"] = min(fields["first_k_dense_replace"], layers - 1)
    if "layer_types" in fields:
        fields["layer_types"] = fields["layer_types"][:layers]
    if "num_nextn_predict_layers" in fields or "first_k_dense_replace" in fields:
        fields["num_nextn_predict_layers"] = 0  # no multi-token-prediction layer
    return fields


def save_random(bridge, fields: dict, folder: Path) -> tuple[int, float]:
    """A random bf16 model of ``fields`` saved to ``folder``: (bytes, seconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    config = AutoConfig.for_model(
        bridge.hf_model_type, architectures=[bridge.architectures[0]], **fields
    )
    torch.manual_seed(0)
    # All bf16: transformers keeps some tensors (a router's correction bias) in fp32, and a
    # mixed-dtype folder needs --dtype, which would make the round trip change those.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="2GB")
    del model
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return size, time.perf_counter() - start


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", required=True, help="a size of a SIZES table, e.g. glm45_air")
    p.add_argument("--layers", type=int, default=2, help="layers kept (default 2)")
    p.add_argument("--workdir", help="where the folders go (default: a temporary folder)")
    args = p.parse_args()
    bridge, fields = find_size(args.size)
    fields = cut_layers(fields, args.layers)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        size, make_s = save_random(bridge, fields, root / "hf")
        cli = [sys.executable, "-m", "megabridge", "convert"]
        to_mg_s, to_mg_mem = measure([*cli, "hf-to-megatron", "--hf-path", str(root / "hf"),
                                      "--megatron-path", str(root / "mg")])  # fmt: skip
        to_hf_s, to_hf_mem = measure([*cli, "megatron-to-hf", "--megatron-path", str(root / "mg"),
                                      "--hf-path", str(root / "back")])  # fmt: skip
        source, back = tensors_of(root / "hf"), tensors_of(root / "back")
        same = source.keys() == back.keys() and all(torch.equal(source[n], back[n]) for n in source)
    result = {
        "size": args.size,
        "family": bridge.family,
        "layers": args.layers,
        "model_gib": round(size / GIB, 3),
        "make_random_s": round(make_s, 1),
        "hf_to_megatron_s": round(to_mg_s, 1),
        "hf_to_megatron_peak_pss_gib": round(to_mg_mem / GIB, 2),
        "megatron_to_hf_s": round(to_hf_s, 1),
        "megatron_to_hf_peak_pss_gib": round(to_hf_mem / GIB, 2),
        "round_trip_bit_exact": same,
    }
    print(json.dumps(result))
    if not same:
        sys.exit("the exported folder differs from the source")


if __name__ == "__main__":
    main()
