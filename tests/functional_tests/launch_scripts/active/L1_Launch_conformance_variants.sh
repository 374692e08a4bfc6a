#!/usr/bin/env bash
# Nightly: every family's non-base tiny variants at TP=2 / PP=2 (EP=2 for MoE), one launch,
# and the four-process layouts kept out of CI (tests/unit_tests/models/test_family_specifics.py).
# CI runs the base variants there and every variant at TP=1 (tests/unit_tests/models/test_conformance.py).
set -euo pipefail
cd "$(dirname "$0")/../../../.."
uv run pytest tests/unit_tests/models/test_conformance.py -k test_parallel -m skipduringci -v "$@"
uv run pytest tests/unit_tests/models/test_family_specifics.py -k test_logits_at_four_processes \
  -m skipduringci -v "$@"
