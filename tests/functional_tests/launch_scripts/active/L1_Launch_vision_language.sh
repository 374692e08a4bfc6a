#!/usr/bin/env bash
# Nightly: the vision-language tests CI leaves out (the CLI both ways, PP=2 / EP=2 and
# Qwen3-VL-MoE's TP=2 on images; SFT at TP=2 / PP=2 / DP=2 against one process); CI runs the
# rest of these files, every dense tower at TP=2 in one launch among them.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/unit_tests/models/test_vision_language.py \
  tests/unit_tests/models/test_qwen3_vl.py tests/unit_tests/models/test_llava.py \
  tests/unit_tests/models/test_gemma3_vl.py tests/functional_tests/test_vision_sft.py \
  tests/unit_tests/data/test_vision_families_sft.py tests/functional_tests/test_vision_families_sft.py \
  -m skipduringci -v "$@"
