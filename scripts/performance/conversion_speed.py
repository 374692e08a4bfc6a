"""Time and peak memory of `megabridge convert hf-to-megatron` and of the streamed
`convert megatron-to-hf` back, against the plain floor.

The floor: load every tensor with safetensors and torch.save it (one process).
Peak memory is the proportional set size (PSS: shared pages split between the
processes that map them, so forked writers are not counted twice) of the whole
process tree, sampled every 20 ms; the script also prints the footprint of the
same command's imports alone (python -c "import megabridge...") for reference: importing
megatron-core is a fixed cost of seconds that has nothing to do with the model's size.

    uv run python scripts/performance/conversion_speed.py --hidden 2048 --layers 16   # ~2 GB bf16
    # keep the model and its checkpoint in DIR, time only the export (floor and imports too):
    uv run python scripts/performance/conversion_speed.py --workdir DIR --export-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

FLOOR = """
import sys, torch
from pathlib import Path
from safetensors import safe_open
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
for file in sorted(src.glob("*.safetensors")):
    with safe_open(str(file), framework="pt") as f:
        for name in f.keys():
            torch.save(f.get_tensor(name), out / f"{name}.pt")
"""

IDLE = "import megabridge.cli, megatron.core, transformers, megabridge.conversion.auto_bridge"


def make_llama(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random bf16 Llama folder, one safetensors file per layer (so that making a large
    one holds a layer in memory, not the model); returns its size in bytes."""
    folder.mkdir(parents=True)
    heads, kv, ffn = hidden // 64, max(hidden // 256, 1), hidden * 4
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}

    def save(tensors: dict, file: str) -> None:
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))

    files = layers + 1
    save({"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden),
          "lm_head.weight": rand(vocab, hidden)}, f"model-00001-of-{files:05d}.safetensors")  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        save({
            p + "input_layernorm.weight": rand(hidden), p + "post_attention_layernorm.weight": rand(hidden),
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv * 64, hidden),
            p + "self_attn.v_proj.weight": rand(kv * 64, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        }, f"model-{i + 2:05d}-of-{files:05d}.safetensors")  # fmt: skip
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return size


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, CPU seconds, peak resident bytes) of the process tree. The CPU seconds
    (user + system) vary far less than the wall time on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        sys.exit(f"{cmd[:4]} failed:\n{err.decode()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    return time.perf_counter() - start, cpu, peak


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--workdir", type=Path, help="keep the model and checkpoint here (reused)")
    p.add_argument("--export-only", action="store_true", help="skip timing hf-to-megatron")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        hf, mg = root / f"hf-{args.hidden}-{args.layers}", root / f"mg-{args.hidden}-{args.layers}"
        if not (hf / "config.json").is_file():
            make_llama(hf, args.hidden, args.layers, args.vocab)
        size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        for stale in ("floor", "back"):
            shutil.rmtree(root / stale, ignore_errors=True)
        floor = measure([sys.executable, "-c", FLOOR, str(hf), str(root / "floor")])
        shutil.rmtree(root / "floor")  # a model's size of disk, needed again for the export
        idle = measure([sys.executable, "-c", IDLE])
        to_mg = [sys.executable, "-m", "megabridge", "convert", "hf-to-megatron", "--hf-path",
                 str(hf), "--megatron-path", str(mg), "--overwrite"]  # fmt: skip
        conv = None
        if not args.export_only or not mg.is_dir():
            conv = measure(to_mg)
        back = measure([sys.executable, "-m", "megabridge", "convert", "megatron-to-hf",
                        "--megatron-path", str(mg), "--hf-path", str(root / "back")])  # fmt: skip
        shutil.rmtree(root / "back")
    gib = 2**30
    print(f"model: {size / gib:.2f} GiB bf16 (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}); wall s, CPU s (user + system), peak PSS")  # fmt: skip
    rows = [("floor (safetensors load + torch.save per tensor)", floor),
            ("imports alone (megabridge, megatron-core, transformers)", idle),
            ("megabridge convert hf-to-megatron", conv),
            ("megabridge convert megatron-to-hf (streamed)", back)]  # fmt: skip
    for label, (wall, cpu, mem) in ((label, m) for label, m in rows if m is not None):
        print(f"{label:57s} {wall:7.1f} s {cpu:7.1f} CPU s {mem / gib:6.2f} GiB")
    for name, measured in (("import", conv), ("export", back)):
        if measured is None:
            continue
        wall, cpu, mem = measured
        print(
            f"{name}: time ratio {wall / floor[0]:.2f}x; without the imports' fixed cost "
            f"{(wall - idle[0]) / floor[0]:.2f}x wall, {(cpu - idle[1]) / floor[1]:.2f}x CPU "
            f"(targets: import <= 2x, export <= 1.5x); peak above the imports / model "
            f"{(mem - idle[2]) / size:.2f} (target < 0.5 at ~2 GB, < 0.25 larger); "
            f"whole process / model {mem / size:.2f}"
        )


if __name__ == "__main__":
    main()
