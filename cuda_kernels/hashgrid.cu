// CUDA hash-grid encoding: forward, backward (inputs; tables by atomicAdd) and the
// double-backward terms needed by the autograd GradICON penalty. Same per-point math as
// the CPU twin (pointmath.h). Torch-free: the torch binding lives in native_cuda.cpp.
#include <cuda_runtime.h>

#include "layout.h"
#include "pointmath.h"

namespace {

template <int D, typename T>
__device__ nr::Cell<D, T> cell_at(const T* x, const nr::LevelLayout& lay, int l, bool smooth) {
  nr::Cell<D, T> cell;
  cell.setup(x, (T)lay.scales[l], lay.resolutions[l], lay.sizes[l], lay.offsets[l], lay.hashed[l], smooth);
  return cell;
}

// One thread per (point, level): this thread's point p and level l, false past the end.
__device__ __forceinline__ bool point_level(int64_t n, int n_levels, int64_t& t, int64_t& p, int& l) {
  t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= n * n_levels) return false;
  p = t / n_levels;
  l = (int)(t % n_levels);
  return true;
}

// one thread per (point, level)
template <int D, typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ table, T* __restrict__ y, int64_t n,
                               int F, nr::LevelLayout lay, bool smooth) {
  int64_t t, p;
  int l;
  if (!point_level(n, lay.n_levels, t, p, l)) return;
  auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
  T* out = y + t * F;
  for (int f = 0; f < F; ++f) out[f] = T(0);
  for (int c = 0; c < (1 << D); ++c) {
    T w = cell.weight(c);
    const T* row = table + (int64_t)cell.rows[c] * F;
    for (int f = 0; f < F; ++f) out[f] += w * row[f];
  }
}

// one thread per (point, level); gx accumulated with atomics over levels
template <int D, typename T>
__global__ void backward_kernel(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ table,
                                T* __restrict__ gx, T* __restrict__ gT, int64_t n, int F, nr::LevelLayout lay,
                                bool smooth) {
  int64_t t, p;
  int l;
  if (!point_level(n, lay.n_levels, t, p, l)) return;
  auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
  const T* g = gy + t * F;
  T acc[D] = {};
  for (int c = 0; c < (1 << D); ++c) {
    const T* row = table + (int64_t)cell.rows[c] * F;
    T w = cell.weight(c);
    T dot = T(0);
    for (int f = 0; f < F; ++f) {
      dot += g[f] * row[f];
      if (gT) atomicAdd(gT + (int64_t)cell.rows[c] * F + f, w * g[f]);
    }
    for (int i = 0; i < D; ++i) acc[i] += dot * cell.dweight(c, i);
  }
  if (gx)
    for (int i = 0; i < D; ++i) atomicAdd(gx + p * D + i, acc[i]);
}

template <int D, typename T>
__global__ void double_backward_kernel(const T* __restrict__ ggx, const T* __restrict__ ggT,
                                       const T* __restrict__ gy, const T* __restrict__ x,
                                       const T* __restrict__ table, T* __restrict__ g_gy, T* __restrict__ g_x,
                                       T* __restrict__ g_T, int64_t n, int F, nr::LevelLayout lay, bool smooth) {
  int64_t t, p;
  int l;
  if (!point_level(n, lay.n_levels, t, p, l)) return;
  auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
  const T* g = gy + t * F;
  const T* gg = ggx ? ggx + p * D : nullptr;
  T* out = g_gy ? g_gy + t * F : nullptr;
  if (out)
    for (int f = 0; f < F; ++f) out[f] = T(0);
  T accx[D] = {};
  for (int c = 0; c < (1 << D); ++c) {
    const T* row = table + (int64_t)cell.rows[c] * F;
    const T* rowgg = ggT ? ggT + (int64_t)cell.rows[c] * F : nullptr;
    T dw[D];
    T dw_dot_gg = T(0);
    for (int i = 0; i < D; ++i) {
      dw[i] = cell.dweight(c, i);
      if (gg) dw_dot_gg += dw[i] * gg[i];
    }
    T w = cell.weight(c);
    T g_row = T(0), g_rowgg = T(0);
    for (int f = 0; f < F; ++f) {
      if (out) out[f] += (rowgg ? w * rowgg[f] : T(0)) + dw_dot_gg * row[f];
      g_row += g[f] * row[f];
      if (rowgg) g_rowgg += g[f] * rowgg[f];
      if (g_T && gg) atomicAdd(g_T + (int64_t)cell.rows[c] * F + f, dw_dot_gg * g[f]);
    }
    for (int j = 0; j < D; ++j) {
      T a = g_rowgg * dw[j];
      if (gg) {
        T h = T(0);
        for (int i = 0; i < D; ++i) h += gg[i] * cell.d2weight(c, i, j);
        a += g_row * h;
      }
      accx[j] += a;
    }
  }
  if (g_x)
    for (int j = 0; j < D; ++j) atomicAdd(g_x + p * D + j, accx[j]);
}

inline unsigned blocks_for(int64_t work, int threads) { return (unsigned)((work + threads - 1) / threads); }

template <typename T>
int launch(int d, int which, const T* ggx, const T* ggT, const T* gy, const T* x, const T* table, T* y_or_gx,
           T* gT_or_gx, T* g_T, int64_t n, int F, const nr::LevelLayout& lay, bool smooth, cudaStream_t stream) {
  const int threads = 128;
  unsigned blocks = blocks_for(n * lay.n_levels, threads);
  if (blocks == 0) return 0;
#define NR_LAUNCH(D)                                                                                            \
  if (which == 0)                                                                                               \
    forward_kernel<D, T><<<blocks, threads, 0, stream>>>(x, table, y_or_gx, n, F, lay, smooth);                 \
  else if (which == 1)                                                                                          \
    backward_kernel<D, T><<<blocks, threads, 0, stream>>>(gy, x, table, y_or_gx, gT_or_gx, n, F, lay, smooth);  \
  else                                                                                                          \
    double_backward_kernel<D, T><<<blocks, threads, 0, stream>>>(ggx, ggT, gy, x, table, y_or_gx, gT_or_gx, g_T, \
                                                                 n, F, lay, smooth);
  if (d == 2) {
    NR_LAUNCH(2)
  } else if (d == 3) {
    NR_LAUNCH(3)
  } else {
    return -1;
  }
#undef NR_LAUNCH
  return (int)cudaGetLastError();
}

}  // namespace

// C launchers. Output buffers of the backward passes (gx, gT, g_x, g_T) must be zeroed.
extern "C" {
int nr_hashgrid_forward_f32(int d, const float* x, const float* table, float* y, int64_t n, int F,
                            const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {
  return launch<float>(d, 0, nullptr, nullptr, nullptr, x, table, y, nullptr, nullptr, n, F, *lay, smooth, s);
}
int nr_hashgrid_forward_f64(int d, const double* x, const double* table, double* y, int64_t n, int F,
                            const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {
  return launch<double>(d, 0, nullptr, nullptr, nullptr, x, table, y, nullptr, nullptr, n, F, *lay, smooth, s);
}
int nr_hashgrid_backward_f32(int d, const float* gy, const float* x, const float* table, float* gx, float* gT,
                             int64_t n, int F, const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {
  return launch<float>(d, 1, nullptr, nullptr, gy, x, table, gx, gT, nullptr, n, F, *lay, smooth, s);
}
int nr_hashgrid_backward_f64(int d, const double* gy, const double* x, const double* table, double* gx, double* gT,
                             int64_t n, int F, const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {
  return launch<double>(d, 1, nullptr, nullptr, gy, x, table, gx, gT, nullptr, n, F, *lay, smooth, s);
}
int nr_hashgrid_double_backward_f32(int d, const float* ggx, const float* ggT, const float* gy, const float* x,
                                    const float* table, float* g_gy, float* g_x, float* g_T, int64_t n, int F,
                                    const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {
  return launch<float>(d, 2, ggx, ggT, gy, x, table, g_gy, g_x, g_T, n, F, *lay, smooth, s);
}
int nr_hashgrid_double_backward_f64(int d, const double* ggx, const double* ggT, const double* gy, const double* x,
                                    const double* table, double* g_gy, double* g_x, double* g_T, int64_t n, int F,
                                    const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {
  return launch<double>(d, 2, ggx, ggT, gy, x, table, g_gy, g_x, g_T, n, F, *lay, smooth, s);
}
}
