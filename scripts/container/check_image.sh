#!/usr/bin/env bash
# Build docker/Dockerfile.ci with buildah on a Debian base made here (debootstrap), then run the
# README's commands inside it: `megabridge --help`, the quick training run, and a tiny
# HF -> Megatron conversion + verify. Prints "container check: PASS" and the image's size, or
# stops at the first failure (non-zero exit). Needs root and Debian's buildah, podman and
# debootstrap (`apt-get install buildah podman debootstrap`); the base is made once (~1 min) and
# reused, and the uv cache is a build-cache mount, so a rebuild after a code change takes
# minutes. No container registry is needed.
#   bash scripts/container/check_image.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=${BASE:-localhost/megabridge-base:bookworm}
IMAGE=${IMAGE:-localhost/megabridge:ci}
say() { printf '[container check %(%H:%M:%S)T] %s\n' -1 "$*"; }

if ! podman image exists "$BASE"; then
  say "making the base image $BASE (debootstrap, minbase + python3)"
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$root" >/dev/null
  tar -C "$root" -c . | podman import - "$BASE" >/dev/null
  rm -rf "$root"
fi

say "building $IMAGE from docker/Dockerfile.ci"
tls=()
if [ -n "${SSL_CERT_FILE:-}" ] && [ -f "$SSL_CERT_FILE" ]; then
  # this machine's CA bundle (a TLS-inspecting proxy's CA, say), mounted for the build only
  bundle=/etc/ssl/certs/megabridge-build-ca.crt
  tls=(--volume "$SSL_CERT_FILE:$bundle:ro" --build-arg SSL_CERT_FILE="$bundle"
       --build-arg PIP_CERT="$bundle")
fi
buildah bud --isolation chroot --layers --build-arg BASE_IMAGE="$BASE" "${tls[@]}" \
  -f docker/Dockerfile.ci -t "$IMAGE" .

ctr=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null' EXIT
inside() { buildah run --isolation chroot --env CUDA_VISIBLE_DEVICES= "$ctr" -- "$@"; }

say "megabridge --help"
inside megabridge --help >/dev/null
say "the quick training run (megabridge train)"
inside sh -c 'cd /tmp && megabridge train' | grep 'iteration 20/20'
say "a tiny HF Llama -> Megatron checkpoint -> verify"
inside python -c '
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LlamaForCausalLM(config).save_pretrained("/tmp/hf_llama")
'
inside megabridge convert hf-to-megatron --hf-path /tmp/hf_llama --megatron-path /tmp/mcore | tail -1
inside megabridge verify --hf-path /tmp/hf_llama --megatron-path /tmp/mcore --json | tail -1
say "no caches left in the image"
leftover=$(inside sh -c 'du -sm /root/.cache 2>/dev/null | cut -f1')
if [ -n "$leftover" ] && [ "$leftover" -gt 1 ]; then
  echo "container check: FAIL: /root/.cache holds ${leftover} MB in the image" >&2
  exit 1
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "container check: PASS ($IMAGE, $((size / 1024 / 1024)) MiB)"
