// CUDA mutual information of B pairs of samples from their joint Parzen histograms
// (losses/similarity.py, mi), and its gradient with respect to the warped sample; and the
// overlap's mutual information (overlap_mi: weighted points, ranges over the counted ones,
// times the overlap's share), with its gradients in the warped sample and the weights. Same
// per-point math as the CPU twin (pointmath.h: joint_entries, mi_point_gradient,
// counted_range, overlap_mi_point_gradients). Three launches forward (ranges, histogram by
// atomics, entropies; the overlap's four), one backward; no shared
// memory or barriers, so the emulation of cuda_compat.h runs them as they are. Compiles with
// nvcc, or as host C++ with NR_EMULATE_CUDA (cuda_compat.h).
#include "cuda_compat.h"
#include "launchers.h"
#include "pointmath.h"

namespace {

constexpr int kMiThreads = 256;

inline unsigned mi_blocks(int64_t work) { return (unsigned)((work + kMiThreads - 1) / kMiThreads); }

// One thread per (batch row, sample): lo and span = max(hi - lo, eps) into scale (B, 4).
template <typename T>
__global__ void mi_range_kernel(const T* __restrict__ w, const T* __restrict__ f, T* __restrict__ scale, int64_t B,
                                int64_t n, T eps) {
  int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= 2 * B) return;
  const int64_t b = t / 2;
  const int s = (int)(t % 2);
  nr::sample_range((s == 0 ? w : f) + b * n, n, eps, scale + b * 4 + 2 * s, scale + b * 4 + 2 * s + 1);
}

// One thread per (batch row, point): its nine weights added to the row's histogram (zeroed).
template <typename T>
__global__ void mi_histogram_kernel(const T* __restrict__ w, const T* __restrict__ f, const T* __restrict__ scale,
                                    T* __restrict__ joint, int64_t B, int64_t n, int bins) {
  int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (q >= B * n) return;
  const int64_t b = q / n;
  int entry[9];
  T product[9];
  nr::joint_entries(w[q], f[q], scale + b * 4, bins, entry, product);
  T* row = joint + b * bins * bins;
  for (int k = 0; k < 9; ++k) atomicAdd(row + entry[k], product[k]);
}

// One thread per (batch row, entry): its marginals by loops over its row and column, its
// log ratio, and its share of -MI added to value (zeroed).
template <typename T>
__global__ void mi_information_kernel(const T* __restrict__ joint, T* __restrict__ log_ratio, T* __restrict__ value,
                                      int64_t B, int64_t n, int bins) {
  int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t entries = (int64_t)bins * bins;
  if (t >= B * entries) return;
  const int64_t b = t / entries;
  const int i = (int)((t % entries) / bins), j = (int)(t % bins);
  const T* row = joint + b * entries;
  T pa = T(0), pb = T(0);
  for (int k = 0; k < bins; ++k) {
    pa += row[i * bins + k] / T(n);
    pb += row[k * bins + j] / T(n);
  }
  const T p = row[i * bins + j] / T(n);
  T den = pa * pb;
  den = den > T(1e-12) ? den : T(1e-12);
  const T r = p / den;
  const T lr = nr::nr_log(r > T(1e-12) ? r : T(1e-12));
  log_ratio[t] = lr;
  atomicAdd(value + b, -p * lr);
}

// One thread per (batch row, point): d(-MI)/d warped times grad.
template <typename T>
__global__ void mi_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w, const T* __restrict__ f,
                                   const T* __restrict__ scale, const T* __restrict__ log_ratio, T* __restrict__ g,
                                   int64_t B, int64_t n, int bins) {
  int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (q >= B * n) return;
  const int64_t b = q / n;
  g[q] = nr::mi_point_gradient<T>(w[q], f[q], scale + b * 4, log_ratio + b * (int64_t)bins * bins, grad[b] / T(n),
                                  bins);
}

template <typename T>
int launch_mi_forward(const T* w, const T* f, T* value, T* log_ratio, T* scale, T* joint, int64_t B, int64_t n,
                      int bins, T eps, cudaStream_t stream) {
  if (B * n == 0) return 0;
  NR_LAUNCH((mi_range_kernel<T>), mi_blocks(2 * B), kMiThreads, stream, w, f, scale, B, n, eps);
  NR_LAUNCH((mi_histogram_kernel<T>), mi_blocks(B * n), kMiThreads, stream, w, f, scale, joint, B, n, bins);
  NR_LAUNCH((mi_information_kernel<T>), mi_blocks(B * bins * bins), kMiThreads, stream, joint, log_ratio, value, B, n,
            bins);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_mi_backward(const T* grad, const T* w, const T* f, const T* scale, const T* log_ratio, T* g, int64_t B,
                       int64_t n, int bins, cudaStream_t stream) {
  if (B * n == 0) return 0;
  NR_LAUNCH((mi_backward_kernel<T>), mi_blocks(B * n), kMiThreads, stream, grad, w, f, scale, log_ratio, g, B, n,
            bins);
  return (int)cudaGetLastError();
}

// The overlap's mutual information (overlap_mi): one thread per (batch row, sample): the
// counted points' lo and span into scale (B, 4).
template <typename T>
__global__ void overlap_range_kernel(const T* __restrict__ w, const T* __restrict__ f, const T* __restrict__ weight,
                                     T* __restrict__ scale, int64_t B, int64_t n, T eps) {
  int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= 2 * B) return;
  const int64_t b = t / 2;
  const int s = (int)(t % 2);
  nr::counted_range((s == 0 ? w : f) + b * n, weight + b * n, n, eps, scale + b * 4 + 2 * s,
                    scale + b * 4 + 2 * s + 1);
}

// One thread per (batch row, point): its nine weights times its weight added to the row's
// histogram (zeroed), and its weight over n to the row's share (stats[3 b], zeroed).
template <typename T>
__global__ void overlap_histogram_kernel(const T* __restrict__ w, const T* __restrict__ f,
                                         const T* __restrict__ weight, const T* __restrict__ scale,
                                         T* __restrict__ joint, T* __restrict__ stats, int64_t B, int64_t n, int bins) {
  int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (q >= B * n) return;
  const int64_t b = q / n;
  int entry[9];
  T product[9];
  nr::joint_entries(w[q], f[q], scale + b * 4, bins, entry, product);
  T* row = joint + b * bins * bins;
  const T m = weight[q];
  for (int k = 0; k < 9; ++k) atomicAdd(row + entry[k], m * product[k]);
  atomicAdd(stats + 3 * b, m / T(n));  // the nine weights sum to 1
}

// One thread per (batch row, entry): q = joint / (n max(s, eps)), its marginals by loops over
// its row and column, its log ratio into entry_grad, and -q log ratio added to I (stats[3 b + 1]).
template <typename T>
__global__ void overlap_information_kernel(const T* __restrict__ joint, T* __restrict__ entry_grad,
                                           T* __restrict__ stats, int64_t B, int64_t n, int bins, T eps) {
  int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t entries = (int64_t)bins * bins;
  if (t >= B * entries) return;
  const int64_t b = t / entries;
  const int i = (int)((t % entries) / bins), j = (int)(t % bins);
  const T s = stats[3 * b];
  const T norm = T(1) / (T(n) * (s > eps ? s : eps));
  const T* row = joint + b * entries;
  T pa = T(0), pb = T(0);
  for (int k = 0; k < bins; ++k) {
    pa += row[i * bins + k] * norm;
    pb += row[k * bins + j] * norm;
  }
  const T q = row[i * bins + j] * norm;
  const T lr = nr::mi_log_ratio(q, pa, pb);
  entry_grad[t] = lr;
  atomicAdd(stats + 3 * b + 1, -q * lr);
}

// One thread per (batch row, entry): its log ratio -> d value / d entry; the row's first
// entry writes the value s I.
template <typename T>
__global__ void overlap_entry_grad_kernel(T* __restrict__ entry_grad, const T* __restrict__ stats,
                                          T* __restrict__ value, int64_t B, int bins, T eps) {
  int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t entries = (int64_t)bins * bins;
  if (t >= B * entries) return;
  const int64_t b = t / entries;
  const T s = stats[3 * b], info = stats[3 * b + 1];
  entry_grad[t] = nr::overlap_entry_grad(entry_grad[t], info, s, eps);
  if (t % entries == 0) value[b] = s * info;
}

// One thread per (batch row, point): d value / d warped and d value / d weight, times grad.
template <typename T>
__global__ void overlap_backward_kernel(const T* __restrict__ grad, const T* __restrict__ w, const T* __restrict__ f,
                                        const T* __restrict__ weight, const T* __restrict__ scale,
                                        const T* __restrict__ entry_grad, T* __restrict__ g_w,
                                        T* __restrict__ g_weight, int64_t B, int64_t n, int bins) {
  int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (q >= B * n) return;
  const int64_t b = q / n;
  nr::overlap_mi_point_gradients<T>(w[q], f[q], weight[q], scale + b * 4, entry_grad + b * (int64_t)bins * bins,
                                    grad[b] / T(n), bins, g_w + q, g_weight + q);
}

// joint (B, bins, bins) and stats (B, 3) zeroed by the caller.
template <typename T>
int launch_overlap_mi_forward(const T* w, const T* f, const T* weight, T* value, T* entry_grad, T* scale, T* joint,
                              T* stats, int64_t B, int64_t n, int bins, T eps, cudaStream_t stream) {
  if (B * n == 0) return 0;
  const int64_t entries = B * bins * bins;
  NR_LAUNCH((overlap_range_kernel<T>), mi_blocks(2 * B), kMiThreads, stream, w, f, weight, scale, B, n, eps);
  NR_LAUNCH((overlap_histogram_kernel<T>), mi_blocks(B * n), kMiThreads, stream, w, f, weight, scale, joint, stats, B,
            n, bins);
  NR_LAUNCH((overlap_information_kernel<T>), mi_blocks(entries), kMiThreads, stream, joint, entry_grad, stats, B, n,
            bins, eps);
  NR_LAUNCH((overlap_entry_grad_kernel<T>), mi_blocks(entries), kMiThreads, stream, entry_grad, stats, value, B, bins,
            eps);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_overlap_mi_backward(const T* grad, const T* w, const T* f, const T* weight, const T* scale,
                               const T* entry_grad, T* g_w, T* g_weight, int64_t B, int64_t n, int bins,
                               cudaStream_t stream) {
  if (B * n == 0) return 0;
  NR_LAUNCH((overlap_backward_kernel<T>), mi_blocks(B * n), kMiThreads, stream, grad, w, f, weight, scale,
            entry_grad, g_w, g_weight, B, n, bins);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" {
int nr_mi_forward_f32(const float* w, const float* f, float* value, float* log_ratio, float* scale, float* joint,
                      int64_t B, int64_t n, int bins, float eps, cudaStream_t s) {
  return launch_mi_forward<float>(w, f, value, log_ratio, scale, joint, B, n, bins, eps, s);
}
int nr_mi_forward_f64(const double* w, const double* f, double* value, double* log_ratio, double* scale,
                      double* joint, int64_t B, int64_t n, int bins, double eps, cudaStream_t s) {
  return launch_mi_forward<double>(w, f, value, log_ratio, scale, joint, B, n, bins, eps, s);
}
int nr_mi_backward_f32(const float* grad, const float* w, const float* f, const float* scale, const float* log_ratio,
                       float* g, int64_t B, int64_t n, int bins, cudaStream_t s) {
  return launch_mi_backward<float>(grad, w, f, scale, log_ratio, g, B, n, bins, s);
}
int nr_mi_backward_f64(const double* grad, const double* w, const double* f, const double* scale,
                       const double* log_ratio, double* g, int64_t B, int64_t n, int bins, cudaStream_t s) {
  return launch_mi_backward<double>(grad, w, f, scale, log_ratio, g, B, n, bins, s);
}
int nr_overlap_mi_forward_f32(const float* w, const float* f, const float* weight, float* value, float* entry_grad,
                              float* scale, float* joint, float* stats, int64_t B, int64_t n, int bins, float eps,
                              cudaStream_t s) {
  return launch_overlap_mi_forward<float>(w, f, weight, value, entry_grad, scale, joint, stats, B, n, bins, eps, s);
}
int nr_overlap_mi_forward_f64(const double* w, const double* f, const double* weight, double* value,
                              double* entry_grad, double* scale, double* joint, double* stats, int64_t B, int64_t n,
                              int bins, double eps, cudaStream_t s) {
  return launch_overlap_mi_forward<double>(w, f, weight, value, entry_grad, scale, joint, stats, B, n, bins, eps, s);
}
int nr_overlap_mi_backward_f32(const float* grad, const float* w, const float* f, const float* weight,
                               const float* scale, const float* entry_grad, float* g_w, float* g_weight, int64_t B,
                               int64_t n, int bins, cudaStream_t s) {
  return launch_overlap_mi_backward<float>(grad, w, f, weight, scale, entry_grad, g_w, g_weight, B, n, bins, s);
}
int nr_overlap_mi_backward_f64(const double* grad, const double* w, const double* f, const double* weight,
                               const double* scale, const double* entry_grad, double* g_w, double* g_weight,
                               int64_t B, int64_t n, int bins, cudaStream_t s) {
  return launch_overlap_mi_backward<double>(grad, w, f, weight, scale, entry_grad, g_w, g_weight, B, n, bins, s);
}
}
