// CUDA hash-grid encoding: forward, backward (inputs; tables by atomicAdd), the
// double-backward terms needed by the autograd GradICON penalty, and the encoding with its
// spatial Jacobian (forward and backward) for the analytic one. Same per-point math as the
// CPU twin (pointmath.h). Torch-free: the torch binding lives in native_cuda.cpp. Compiles
// with nvcc, or as host C++ with NR_EMULATE_CUDA (cuda_compat.h).
#include "cuda_compat.h"
#include "launchers.h"
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

// One thread per (point, level): y of this level at the clamped point and, for the first
// n_jac points, its Jacobian rows along the directions (native_cpu.cpp's
// forward_jacobian_impl), no atomics.
template <int D, typename T>
__global__ void forward_jacobian_kernel(const T* __restrict__ x, const T* __restrict__ table,
                                        const T* __restrict__ dmat, T* __restrict__ y, T* __restrict__ dirs,
                                        int64_t n, int64_t n_jac, int F, nr::LevelLayout lay, bool smooth) {
  int64_t t, p;
  int l;
  if (!point_level(n, lay.n_levels, t, p, l)) return;
  T xc[D], inside[D], m[D][D], jl[8 * D];
  nr::clamp_point<D, T>(x + p * D, xc, inside);
  auto cell = cell_at<D, T>(xc, lay, l, smooth);
  const bool with_dirs = p < n_jac;
  T* out = y + t * F;
  for (int f = 0; f < F; ++f) out[f] = T(0);
  for (int k = 0; k < F * D; ++k) jl[k] = T(0);
  for (int c = 0; c < (1 << D); ++c) {
    T w, dw[D];
    cell.corner(c, w, dw, nullptr);
    const T* row = table + (int64_t)cell.rows[c] * F;
    for (int f = 0; f < F; ++f) {
      out[f] += w * row[f];
      if (with_dirs)
        for (int i = 0; i < D; ++i) jl[f * D + i] += dw[i] * row[f];
    }
  }
  if (!with_dirs) return;
  nr::direction_matrix<D, T>(dmat, inside, m);
  const int64_t LF = (int64_t)lay.n_levels * F;
  for (int j = 0; j < D; ++j) {
    T* dout = dirs + (p * D + j) * LF + (int64_t)l * F;
    for (int f = 0; f < F; ++f) {
      T a = T(0);
      for (int k = 0; k < D; ++k) a += m[j][k] * jl[f * D + k];
      dout[f] = a;
    }
  }
}

// Backward of (y, dirs) against (gy, gdirs), one thread per (point, level), with
// G[f][i] = sum_j gdirs[p, j, l F + f] m[j][i] (zero for p >= n_jac):
//   g_T[row,f] += w_c gy[p,l,f] + sum_i dw_c/dx_i G[f][i]          (atomics)
//   g_x[p,j]   += inside_j sum_{c,f} T[row,f] (gy dw_c/dx_j + sum_i G[f][i] d2w_c/dx_i dx_j)   (atomics over levels)
template <int D, typename T>
__global__ void jacobian_backward_kernel(const T* __restrict__ gy, const T* __restrict__ gdirs,
                                         const T* __restrict__ x, const T* __restrict__ table,
                                         const T* __restrict__ dmat, T* __restrict__ g_x, T* __restrict__ g_T,
                                         int64_t n, int64_t n_jac, int F, nr::LevelLayout lay, bool smooth) {
  int64_t t, p;
  int l;
  if (!point_level(n, lay.n_levels, t, p, l)) return;
  T xc[D], inside[D], m[D][D], G[8 * D];
  nr::clamp_point<D, T>(x + p * D, xc, inside);
  auto cell = cell_at<D, T>(xc, lay, l, smooth);
  const bool with_dirs = p < n_jac;
  if (with_dirs) {
    nr::direction_matrix<D, T>(dmat, inside, m);
    const int64_t LF = (int64_t)lay.n_levels * F;
    for (int f = 0; f < F; ++f)
      for (int i = 0; i < D; ++i) {
        T a = T(0);
        for (int j = 0; j < D; ++j) a += gdirs[(p * D + j) * LF + (int64_t)l * F + f] * m[j][i];
        G[f * D + i] = a;
      }
  }
  const T* g = gy + t * F;
  T acc[D] = {};
  for (int c = 0; c < (1 << D); ++c) {
    T w, dw[D];
    cell.corner(c, w, dw, nullptr);
    const T* row = table + (int64_t)cell.rows[c] * F;
    for (int f = 0; f < F; ++f) {
      if (g_T) {
        T a = w * g[f];
        if (with_dirs)
          for (int i = 0; i < D; ++i) a += dw[i] * G[f * D + i];
        atomicAdd(g_T + (int64_t)cell.rows[c] * F + f, a);
      }
      if (g_x) {
        for (int j = 0; j < D; ++j) {
          T a = g[f] * dw[j];
          if (with_dirs)
            for (int i = 0; i < D; ++i) a += G[f * D + i] * cell.d2weight(c, i, j);
          acc[j] += row[f] * a;
        }
      }
    }
  }
  if (g_x)
    for (int j = 0; j < D; ++j) atomicAdd(g_x + p * D + j, acc[j] * inside[j]);
}

constexpr int kThreads = 128;

inline unsigned blocks_for(int64_t work) { return (unsigned)((work + kThreads - 1) / kThreads); }

enum Op { kForward, kBackward, kDoubleBackward, kForwardJacobian, kJacobianBackward };

// Every kernel over the (point, level) grid. Buffer roles per op (unused ones null):
//   forward:          x, table -> out0 = y
//   backward:         gy, x, table -> out0 = gx, out1 = gT
//   double backward:  ggx, ggT, gy, x, table -> out0 = g_gy, out1 = g_x, out2 = g_T
//   forward jacobian: x, table, dmat -> out0 = y, out1 = dirs (first n_jac points)
//   jacobian backward: gy, in1 = gdirs, x, table, dmat -> out0 = g_x, out1 = g_T
template <typename T, int D>
void launch_dim(Op op, const T* in0, const T* in1, const T* gy, const T* x, const T* table, T* out0, T* out1, T* out2,
                const T* dmat, int64_t n, int64_t n_jac, int F, const nr::LevelLayout& lay, bool smooth,
                cudaStream_t stream) {
  const unsigned blocks = blocks_for(n * lay.n_levels);
  switch (op) {
    case kForward:
      NR_LAUNCH((forward_kernel<D, T>), blocks, kThreads, stream, x, table, out0, n, F, lay, smooth);
      break;
    case kBackward:
      NR_LAUNCH((backward_kernel<D, T>), blocks, kThreads, stream, gy, x, table, out0, out1, n, F, lay, smooth);
      break;
    case kDoubleBackward:
      NR_LAUNCH((double_backward_kernel<D, T>), blocks, kThreads, stream, in0, in1, gy, x, table, out0, out1, out2, n,
                F, lay, smooth);
      break;
    case kForwardJacobian:
      NR_LAUNCH((forward_jacobian_kernel<D, T>), blocks, kThreads, stream, x, table, dmat, out0, out1, n, n_jac, F, lay,
                smooth);
      break;
    case kJacobianBackward:
      NR_LAUNCH((jacobian_backward_kernel<D, T>), blocks, kThreads, stream, gy, in1, x, table, dmat, out0, out1, n,
                n_jac, F, lay, smooth);
      break;
  }
}

template <typename T>
int launch(int d, Op op, const T* in0, const T* in1, const T* gy, const T* x, const T* table, T* out0, T* out1,
           T* out2, const T* dmat, int64_t n, int64_t n_jac, int F, const nr::LevelLayout& lay, bool smooth,
           cudaStream_t stream) {
  if (n * lay.n_levels == 0) return 0;
  if (d == 2)
    launch_dim<T, 2>(op, in0, in1, gy, x, table, out0, out1, out2, dmat, n, n_jac, F, lay, smooth, stream);
  else if (d == 3)
    launch_dim<T, 3>(op, in0, in1, gy, x, table, out0, out1, out2, dmat, n, n_jac, F, lay, smooth, stream);
  else
    return -1;
  return (int)cudaGetLastError();
}

}  // namespace

// C launchers, declared in launchers.h.
#define NR_HASHGRID_LAUNCHERS(T, SUFFIX)                                                                               \
  int nr_hashgrid_forward_##SUFFIX(int d, const T* x, const T* table, T* y, int64_t n, int F,                          \
                                   const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {                          \
    return launch<T>(d, kForward, nullptr, nullptr, nullptr, x, table, y, nullptr, nullptr, nullptr, n, 0, F, *lay,    \
                     smooth, s);                                                                                       \
  }                                                                                                                    \
  int nr_hashgrid_backward_##SUFFIX(int d, const T* gy, const T* x, const T* table, T* gx, T* gT, int64_t n, int F,   \
                                    const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {                         \
    return launch<T>(d, kBackward, nullptr, nullptr, gy, x, table, gx, gT, nullptr, nullptr, n, 0, F, *lay, smooth,    \
                     s);                                                                                               \
  }                                                                                                                    \
  int nr_hashgrid_double_backward_##SUFFIX(int d, const T* ggx, const T* ggT, const T* gy, const T* x, const T* table, \
                                           T* g_gy, T* g_x, T* g_T, int64_t n, int F, const nr::LevelLayout* lay,      \
                                           bool smooth, cudaStream_t s) {                                              \
    return launch<T>(d, kDoubleBackward, ggx, ggT, gy, x, table, g_gy, g_x, g_T, nullptr, n, 0, F, *lay, smooth, s);   \
  }                                                                                                                    \
  int nr_hashgrid_forward_jacobian_##SUFFIX(int d, const T* x, const T* table, const T* directions, T* y, T* dirs,     \
                                            int64_t n, int64_t n_jac, int F, const nr::LevelLayout* lay, bool smooth,  \
                                            cudaStream_t s) {                                                          \
    return launch<T>(d, kForwardJacobian, nullptr, nullptr, nullptr, x, table, y, dirs, nullptr, directions, n, n_jac, \
                     F, *lay, smooth, s);                                                                              \
  }                                                                                                                    \
  int nr_hashgrid_jacobian_backward_##SUFFIX(int d, const T* gy, const T* gdirs, const T* x, const T* table,           \
                                             const T* directions, T* g_x, T* g_T, int64_t n, int64_t n_jac, int F,     \
                                             const nr::LevelLayout* lay, bool smooth, cudaStream_t s) {                \
    return launch<T>(d, kJacobianBackward, nullptr, gdirs, gy, x, table, g_x, g_T, nullptr, directions, n, n_jac, F,   \
                     *lay, smooth, s);                                                                                 \
  }

extern "C" {
NR_HASHGRID_LAUNCHERS(float, f32)
NR_HASHGRID_LAUNCHERS(double, f64)
}
