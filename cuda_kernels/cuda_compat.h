// What the kernels (hashgrid.cu, warp.cu) need from CUDA, real or emulated.
//
// With NR_EMULATE_CUDA defined (native_emulated.cpp) the kernels compile as host C++:
// __global__/__device__ vanish, blockIdx/threadIdx/blockDim are per-launch variables,
// NR_LAUNCH runs every (block, thread) of the grid in order and atomicAdd is a plain
// add. The kernels use no shared memory or barriers, so this sequential schedule is one
// of the schedules a GPU may run: their launch configurations, index arithmetic and
// atomics are exercised on any CPU, in CI.
#pragma once

#if defined(NR_EMULATE_CUDA)
#include <stdint.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
typedef void* cudaStream_t;

namespace nr {
namespace emu {
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline Dim3 blockIdx, threadIdx, blockDim, gridDim;

template <typename Kernel, typename... Args>
void launch(unsigned blocks, unsigned threads, Kernel kernel, Args... args) {
  gridDim.x = blocks;
  blockDim.x = threads;
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    for (unsigned t = 0; t < threads; ++t) {
      threadIdx.x = t;
      kernel(args...);
    }
  }
}
}  // namespace emu
}  // namespace nr

using nr::emu::blockDim;
using nr::emu::blockIdx;
using nr::emu::threadIdx;

template <typename T>
inline T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}
inline int cudaGetLastError() { return 0; }

// kernel in parentheses when it is a template: NR_LAUNCH((k<D, T>), blocks, threads, stream, args...)
#define NR_LAUNCH(kernel, blocks, threads, stream, ...) nr::emu::launch(blocks, threads, kernel, __VA_ARGS__)
#else
#include <cuda_runtime.h>
#define NR_LAUNCH(kernel, blocks, threads, stream, ...) kernel<<<blocks, threads, 0, stream>>>(__VA_ARGS__)
#endif
