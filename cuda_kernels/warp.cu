// CUDA fused warp: value and spatial gradient (none where grads is null) of a volume (or of
// a channel-last volume's C channels) at voxel-index points, in one pass (pointmath.h's sample_with_gradient, the same function as the CPU twin). Compiles
// with nvcc, or as host C++ with NR_EMULATE_CUDA (cuda_compat.h).
#include "cuda_compat.h"
#include "launchers.h"
#include "pointmath.h"

namespace {

struct Shape {
  int64_t n[3];
};

template <int D, typename T>
__global__ void warp_kernel(const T* __restrict__ image, Shape shape, const T* __restrict__ points,
                            T* __restrict__ values, T* __restrict__ grads, int64_t n) {
  int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= n) return;
  values[p] = nr::sample_with_gradient<D, T>(image, shape.n, points + p * D, grads ? grads + p * D : nullptr);
}

template <int D, typename T>
__global__ void warp_channels_kernel(const T* __restrict__ image, Shape shape, int64_t channels,
                                     const T* __restrict__ points, T* __restrict__ values, T* __restrict__ grads,
                                     int64_t n) {
  int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (p >= n) return;
  nr::sample_channels_with_gradient<D, T>(image, shape.n, channels, points + p * D, values + p * channels,
                                          grads ? grads + p * channels * D : nullptr);
}

template <typename T>
int launch_warp_channels(int d, const T* image, const int64_t* shape, int64_t channels, const T* points, T* values,
                         T* grads, int64_t n, cudaStream_t stream) {
  Shape s{{shape[0], shape[1], d == 3 ? shape[2] : 1}};
  const int threads = 128;
  unsigned blocks = (unsigned)((n + threads - 1) / threads);
  if (blocks == 0) return 0;
  if (d == 2)
    NR_LAUNCH((warp_channels_kernel<2, T>), blocks, threads, stream, image, s, channels, points, values, grads, n);
  else if (d == 3)
    NR_LAUNCH((warp_channels_kernel<3, T>), blocks, threads, stream, image, s, channels, points, values, grads, n);
  else
    return -1;
  return (int)cudaGetLastError();
}

template <typename T>
int launch_warp(int d, const T* image, const int64_t* shape, const T* points, T* values, T* grads, int64_t n,
           cudaStream_t stream) {
  Shape s{{shape[0], shape[1], d == 3 ? shape[2] : 1}};
  const int threads = 256;
  unsigned blocks = (unsigned)((n + threads - 1) / threads);
  if (blocks == 0) return 0;
  if (d == 2)
    NR_LAUNCH((warp_kernel<2, T>), blocks, threads, stream, image, s, points, values, grads, n);
  else if (d == 3)
    NR_LAUNCH((warp_kernel<3, T>), blocks, threads, stream, image, s, points, values, grads, n);
  else
    return -1;
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {
int nr_warp_f32(int d, const float* image, const int64_t* shape, const float* points, float* values, float* grads,
                int64_t n, cudaStream_t s) {
  return launch_warp<float>(d, image, shape, points, values, grads, n, s);
}
int nr_warp_f64(int d, const double* image, const int64_t* shape, const double* points, double* values,
                double* grads, int64_t n, cudaStream_t s) {
  return launch_warp<double>(d, image, shape, points, values, grads, n, s);
}
int nr_warp_channels_f32(int d, const float* image, const int64_t* shape, int64_t channels, const float* points,
                         float* values, float* grads, int64_t n, cudaStream_t s) {
  return launch_warp_channels<float>(d, image, shape, channels, points, values, grads, n, s);
}
int nr_warp_channels_f64(int d, const double* image, const int64_t* shape, int64_t channels, const double* points,
                         double* values, double* grads, int64_t n, cudaStream_t s) {
  return launch_warp_channels<double>(d, image, shape, channels, points, values, grads, n, s);
}
}
