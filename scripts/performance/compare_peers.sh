#!/usr/bin/env bash
# megabridge against torchtitan (bf16 and torchao float8) and HF + Liger on one GPU, one table:
#   bash scripts/performance/compare_peers.sh [--mbs 4 8 16] [--compare ...] [--iters N]
# In the project's environment the peers come from `uv sync --group peers`. On a machine with its
# own torch and no registry access (the GPU box: torch 2.11), put their wheels and megatron-core's
# in .whl/ first, from a machine that reaches PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl megatron-core==0.16.1 \
#     xxhash==4.1.0 torchtitan==0.2.2 torchao==0.17.0 liger-kernel==0.8.5 tyro==1.0.17 \
#     docstring-parser==0.18.0 typeguard==4.6.1 torchdata==0.11.0
# (torchtitan imports tyro and torchdata at start, and `datasets`, which peers.py stubs.)
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c "import torchtitan, megatron.core" >/dev/null 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/megabridge-peers-site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Options only after the script's name; the overrides go after "--" (the model shape of 12-02).
exec python3 scripts/performance/train_throughput.py --fp8 tensorwise rowwise --recompute-swiglu \
  --compare torchtitan,torchtitan-float8,hf,hf-liger "$@" \
  -- model.vocab_size=32768 model.share_embeddings_and_output_weights=false
