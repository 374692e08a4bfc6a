#!/usr/bin/env bash
# Same seed, same weights: the first losses of the torch (fast) and local (reference) layer specs.
# Usage: bash scripts/performance/compare_specs.sh [extra overrides]
set -euo pipefail
cd "$(dirname "$0")/../.."
run() {
  python3 -m megabridge train --recipe llama_tiny_pretrain_config train.train_iters=5 \
    model.transformer_impl="$1" checkpoint.save="$2/ckpt" logger.log_dir="$2/logs" "${@:3}" >/dev/null \
    || echo "($1: exit $?; losses below were logged before it)"
  python3 -c "import json,sys; print('$1', [round(json.loads(l)['loss'], 4) for l in open('$2/logs/metrics.jsonl') if 'loss' in l])"
}
tmp=$(mktemp -d)
run torch "$tmp/torch" "$@"
run local "$tmp/local" "$@"
