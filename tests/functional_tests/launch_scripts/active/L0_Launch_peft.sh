#!/usr/bin/env bash
# LoRA / DoRA: frozen base, adapter-only checkpoints and resume, merged and peft-format exports, TP=2.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
# The DoRA + sequence-parallel TP=2 check (skipduringci, ~3 min) runs with: -m skipduringci
uv run pytest tests/unit_tests/peft tests/functional_tests/test_peft.py -m "not skipduringci" -v "$@"
