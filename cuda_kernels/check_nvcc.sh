#!/usr/bin/env bash
# Compile every .cu for sm_80 and sm_90 (no GPU needed). Skips with a message when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "nvcc not found: CUDA compile check skipped"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for cu in *.cu; do
  "$NVCC" -std=c++17 -O3 -c "$cu" -o "$out/${cu%.cu}.o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  echo "nvcc: $cu compiled for sm_80 and sm_90"
done
