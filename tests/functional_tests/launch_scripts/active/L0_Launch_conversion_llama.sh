#!/usr/bin/env bash
# HF <-> Megatron conversion: Llama round trips, TP/PP logits, CLI errors, fine-tuning from a conversion.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_conversion_cli.py tests/unit_tests/models/test_llama.py -v "$@"
