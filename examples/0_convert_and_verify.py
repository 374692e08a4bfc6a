"""Convert an HF model to Megatron-Core, check its logits, and write it back unchanged.

    uv run python examples/0_convert_and_verify.py --hf-path /models/Llama-3.2-1B --out /tmp/llama-back
    uv run python examples/0_convert_and_verify.py --tiny          # builds a tiny random Llama first

Runs on a laptop CPU; under torchrun it shards the model (set TP/PP below).
"""

import argparse
import tempfile
from pathlib import Path

import torch

from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.verify import compare, hf_logits, megatron_logits, sample_tokens


def tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-path")
    p.add_argument("--out")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    hf_path = tiny_llama(work / "tiny") if args.tiny else Path(args.hf_path)
    out = Path(args.out) if args.out else work / "back"

    # 1. HF folder -> Megatron-Core model on this rank (fp32 for an exact comparison)
    bridge = AutoBridge.from_hf_pretrained(hf_path)
    provider = bridge.to_megatron_provider()
    provider.bf16 = False
    provider.tensor_model_parallel_size = 1
    model = bridge.to_megatron_model(provider)

    # 2. the same tokens through transformers and through Megatron
    tokens = sample_tokens(provider.vocab_size, batch=2, seq_len=32, seed=0)
    logits = megatron_logits(model, tokens)
    if logits is not None:  # the last pipeline stage
        reference = hf_logits(hf_path, tokens, torch.float32, logits.device)
        result = compare(
            reference, logits, provider.vocab_size, torch.float32, atol=None, min_top1=None
        )
        print(
            f"max |logit diff| {result.max_abs_diff:.2e}, top-1 agreement {result.top1_agreement:.3f}"
        )

    # 3. back to an HF folder: same tensor names, dtypes and bytes as the source
    bridge.save_hf_pretrained(model, out, overwrite=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
