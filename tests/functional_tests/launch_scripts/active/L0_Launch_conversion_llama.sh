#!/usr/bin/env bash
# HF <-> Megatron conversion: Llama conformance (round trips, TP/PP logits), CLI errors, fine-tuning from a conversion.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/functional_tests/test_conversion_cli.py -v "$@"
uv run pytest tests/unit_tests/models/test_conformance.py -k llama -v "$@"
