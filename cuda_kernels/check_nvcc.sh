#!/usr/bin/env bash
# Compile the CUDA side without a GPU:
#  1. every .cu for sm_80 and sm_90 with nvcc;
#  2. the real (non-emulated) torch binding native_cuda.cpp with g++ -fsyntax-only against
#     torch's headers and the CUDA headers: the binding that a GPU machine builds on first
#     use, which nothing else compiles without a GPU (native_emulated.cpp takes the other
#     branch of its #if). A CPU build of torch lacks the generated
#     c10/cuda/impl/cuda_cmake_macros.h: an empty stand-in takes its place. The flags are
#     native.py's (-std=c++17); -w hides the warnings of torch's own headers, not errors.
# Without nvcc it skips with a message, except under CI (CI set), where that is a failure.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  if [ -n "${CI:-}" ]; then
    echo "nvcc not found: the CUDA compile check cannot run (CI is set: failing)" >&2
    exit 1
  fi
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

PYTHON="${PYTHON:-python}"
cuda_home="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
cuda_include="${CUDA_INCLUDE:-$cuda_home/include}"
[ -f "$cuda_include/cuda_runtime.h" ] || cuda_include=/usr/local/cuda/include
read -r -a torch_includes < <("$PYTHON" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
mkdir -p "$out/stand-in/c10/cuda/impl"
: >"$out/stand-in/c10/cuda/impl/cuda_cmake_macros.h"
"${CXX:-g++}" -std=c++17 -w -fsyntax-only -DTORCH_EXTENSION_NAME=neuralreg_cuda_check \
  "${torch_includes[@]}" -I"$cuda_include" -I"$out/stand-in" native_cuda.cpp
echo "g++: native_cuda.cpp (the real CUDA binding) compiles against torch's and CUDA's headers"
