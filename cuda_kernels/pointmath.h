// Per-point math shared by the CUDA kernels and their CPU twins.
//
// tcnn-compatible hash-grid cell lookup (level scale/resolution, dense index or XOR
// hash with primes 1, 2654435761, 805459861 and 32-bit wraparound, position offset 0.5),
// interpolation weights with first and second derivatives (Linear, Smoothstep), and the
// trilinear/bilinear image sample with its spatial gradient (zero outside the grid,
// voxel centers at integer indices, the same as grid_sample(align_corners=True)).
// No torch here: nvcc compiles this in seconds.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define NR_HD __host__ __device__ __forceinline__
#else
#define NR_HD inline
#endif

namespace nr {

NR_HD float nr_floor(float x) { return floorf(x); }
NR_HD double nr_floor(double x) { return ::floor(x); }
NR_HD float nr_rint(float x) { return rintf(x); }  // half to even (the default rounding mode)
NR_HD double nr_rint(double x) { return ::rint(x); }
NR_HD float nr_log(float x) { return logf(x); }
NR_HD double nr_log(double x) { return ::log(x); }

NR_HD uint32_t prime(int i) { return i == 0 ? 1u : (i == 1 ? 2654435761u : 805459861u); }

// tcnn grid_index for integer vertex coordinates.
template <int D>
NR_HD uint32_t grid_index(const uint32_t* pos, uint32_t resolution, uint32_t size, bool hashed) {
  uint32_t index = 0;
  if (hashed) {
    for (int i = 0; i < D; ++i) index ^= pos[i] * prime(i);
  } else {
    uint32_t stride = 1;
    for (int i = 0; i < D; ++i) {
      index += pos[i] * stride;
      stride *= resolution;
    }
  }
  // same result as index % size, without a division in the common cases
  if ((size & (size - 1)) == 0) return index & (size - 1);
  return index < size ? index : index % size;
}

// One level's cell around a point: corner rows and 1D weights with derivatives
// (w1 = weight of the upper vertex along an axis; the lower one has 1 - w1).
template <int D, typename T>
struct Cell {
  uint32_t rows[1 << D];
  T s[D], ds[D], d2s[D];

  NR_HD void setup(const T* x, T scale, uint32_t resolution, uint32_t size, uint32_t offset, bool hashed,
                   bool smooth) {
    uint32_t base[D];
    for (int i = 0; i < D; ++i) {
      T pos = scale * x[i] + T(0.5);
      T fl = nr_floor(pos);
      T f = pos - fl;
      base[i] = (uint32_t)(int)fl;
      if (smooth) {
        s[i] = f * f * (T(3) - T(2) * f);
        ds[i] = T(6) * f * (T(1) - f) * scale;
        d2s[i] = (T(6) - T(12) * f) * scale * scale;
      } else {
        s[i] = f;
        ds[i] = scale;
        d2s[i] = T(0);
      }
    }
    for (int c = 0; c < (1 << D); ++c) {
      uint32_t v[D];
      for (int i = 0; i < D; ++i) v[i] = base[i] + ((c >> i) & 1);
      rows[c] = offset + grid_index<D>(v, resolution, size, hashed);
    }
  }
  // Per-corner factors along each axis, and the weight with its first and second
  // derivatives: dw[i] = d w / d x_i, d2w[i][j] = d2 w / d x_i d x_j.
  NR_HD void corner(int c, T& w, T* dw, T (*d2w)[D]) const {
    T a[D], da[D], d2a[D];
    for (int i = 0; i < D; ++i) {
      bool up = (c >> i) & 1;
      a[i] = up ? s[i] : T(1) - s[i];
      da[i] = up ? ds[i] : -ds[i];
      d2a[i] = up ? d2s[i] : -d2s[i];
    }
    w = T(1);
    for (int i = 0; i < D; ++i) w *= a[i];
    for (int i = 0; i < D; ++i) {
      T rest = T(1);
      for (int k = 0; k < D; ++k)
        if (k != i) rest *= a[k];
      dw[i] = da[i] * rest;
      if (d2w) {
        d2w[i][i] = d2a[i] * rest;
        for (int j = i + 1; j < D; ++j) {
          T r = T(1);
          for (int k = 0; k < D; ++k)
            if (k != i && k != j) r *= a[k];
          d2w[i][j] = d2w[j][i] = da[i] * da[j] * r;
        }
      }
    }
  }
  NR_HD T factor(int c, int i) const { return ((c >> i) & 1) ? s[i] : T(1) - s[i]; }
  NR_HD T dfactor(int c, int i) const { return ((c >> i) & 1) ? ds[i] : -ds[i]; }
  NR_HD T d2factor(int c, int i) const { return ((c >> i) & 1) ? d2s[i] : -d2s[i]; }
  NR_HD T weight(int c) const {
    T w = T(1);
    for (int i = 0; i < D; ++i) w *= factor(c, i);
    return w;
  }
  // d weight / d x_i
  NR_HD T dweight(int c, int i) const {
    T w = dfactor(c, i);
    for (int k = 0; k < D; ++k)
      if (k != i) w *= factor(c, k);
    return w;
  }
  // d2 weight / d x_i d x_j
  NR_HD T d2weight(int c, int i, int j) const {
    T w;
    if (i == j) {
      w = d2factor(c, i);
    } else {
      w = dfactor(c, i) * dfactor(c, j);
    }
    for (int k = 0; k < D; ++k)
      if (k != i && k != j) w *= factor(c, k);
    return w;
  }
};

// A point clamped to the encoding's box [0, 1]^D, and the clamp's derivative: inside[k] = 1
// where 0 <= x[k] <= 1, else 0 (NaN: 0; xc keeps it, as torch.clamp does).
template <int D, typename T>
NR_HD void clamp_point(const T* x, T* xc, T* inside) {
  for (int k = 0; k < D; ++k) {
    T v = x[k];
    inside[k] = (v >= T(0) && v <= T(1)) ? T(1) : T(0);
    xc[k] = v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
  }
}

// The directions of a point's Jacobian rows: m[j][k] = dmat[j][k] inside[k], so that the
// row along direction j is sum_k m[j][k] d enc / d xc_k (dmat (D, D) row-major).
template <int D, typename T>
NR_HD void direction_matrix(const T* dmat, const T* inside, T (*m)[D]) {
  for (int j = 0; j < D; ++j)
    for (int k = 0; k < D; ++k) m[j][k] = dmat[j * D + k] * inside[k];
}

// Mutual information's quadratic B-spline Parzen window (losses/similarity.py, _spline_bins):
// the value x scaled by its sample's range (lo, span = max(hi - lo, eps)) to
// t = (x - lo) / span (bins - 3) + 1, its bin centre c = round(t) (half to even, as
// torch.round), d = t - c; the three bins c - 1, c, c + 1 (clamped to [0, bins)) and their
// weights 0.5 (0.5 - d)^2, 0.75 - d^2, 0.5 (0.5 + d)^2. Returns d.
template <typename T>
NR_HD T spline_bins(T x, T lo, T span, int bins, int* index, T* weight) {
  T t = (x - lo) / span * T(bins - 3) + T(1);
  T c = nr_rint(t);
  T d = t - c;
  weight[0] = T(0.5) * (T(0.5) - d) * (T(0.5) - d);
  weight[1] = T(0.75) - d * d;
  weight[2] = T(0.5) * (T(0.5) + d) * (T(0.5) + d);
  for (int k = 0; k < 3; ++k) {
    int i = (int)c + k - 1;
    index[k] = i < 0 ? 0 : (i > bins - 1 ? bins - 1 : i);
  }
  return d;
}

// A point's nine joint-histogram entries (row-major in a bins x bins row) and their window
// products, its warped value x and fixed value y scaled by ``scale`` (lo, span of each).
template <typename T>
NR_HD void joint_entries(T x, T y, const T* scale, int bins, int* entry, T* product) {
  int ia[3], ib[3];
  T wa[3], wb[3];
  spline_bins(x, scale[0], scale[1], bins, ia, wa);
  spline_bins(y, scale[2], scale[3], bins, ib, wb);
  for (int k = 0; k < 3; ++k)
    for (int k2 = 0; k2 < 3; ++k2) {
      entry[3 * k + k2] = ia[k] * bins + ib[k2];
      product[3 * k + k2] = wa[k] * wb[k2];
    }
}

// A sample's range as spline_bins reads it: its lowest value lo and span = max(hi - lo, eps).
template <typename T>
NR_HD void sample_range(const T* v, int64_t n, T eps, T* lo_out, T* span_out) {
  T lo = v[0], hi = v[0];
  for (int64_t p = 1; p < n; ++p) {
    lo = v[p] < lo ? v[p] : lo;
    hi = v[p] > hi ? v[p] : hi;
  }
  *lo_out = lo;
  *span_out = hi - lo > eps ? hi - lo : eps;
}

// d(-MI)/d(warped value) of one point (losses/similarity.py, _MutualInformation.backward):
// the gradient of -MI with respect to a joint entry is (1 - log_ratio) grad / n; the point
// gathers it from its nine entries, weighted by the fixed value's window, times the
// derivative of its own window and of its scaling (bins - 3) / span. ``row`` = the
// point's batch row of log_ratio (bins x bins).
template <typename T>
NR_HD T mi_point_gradient(T x, T y, const T* scale, const T* row, T grad_over_n, int bins) {
  int ia[3], ib[3];
  T wa[3], wb[3];
  spline_bins(x, scale[0], scale[1], bins, ia, wa);
  spline_bins(y, scale[2], scale[3], bins, ib, wb);
  T g[3];
  for (int k = 0; k < 3; ++k) {
    T a = T(0);
    for (int k2 = 0; k2 < 3; ++k2) a += (T(1) - row[ia[k] * bins + ib[k2]]) * grad_over_n * wb[k2];
    g[k] = a;
  }
  T d = wa[2] - wa[0];  // the offset from the bin's centre
  T gd = d * (g[0] - T(2) * g[1] + g[2]) + T(0.5) * (g[2] - g[0]);
  return gd * T(bins - 3) / scale[1];
}

// The range of the counted points of a sample (``weight`` > 0), as the overlap's mutual
// information reads it (losses/similarity.py, overlap_mi): lo and span = max(hi - lo, eps)
// over those points; with none counted, lo = the sample's largest value and span = eps.
template <typename T>
NR_HD void counted_range(const T* v, const T* weight, int64_t n, T eps, T* lo_out, T* span_out) {
  T lo = T(0), hi = T(0), top = v[0];
  bool any = false;
  for (int64_t p = 0; p < n; ++p) {
    top = v[p] > top ? v[p] : top;
    if (!(weight[p] > T(0))) continue;
    lo = any && lo < v[p] ? lo : v[p];
    hi = any && hi > v[p] ? hi : v[p];
    any = true;
  }
  if (!any) lo = hi = top;
  *lo_out = lo;
  *span_out = hi - lo > eps ? hi - lo : eps;
}

// log(q / (p_i p_j)) of a joint entry q and its marginals, the product floored at 1e-12
// and the ratio too, as mi's (losses/similarity.py, _information).
template <typename T>
NR_HD T mi_log_ratio(T q, T pa, T pb) {
  T den = pa * pb;
  den = den > T(1e-12) ? den : T(1e-12);
  const T r = q / den;
  return nr_log(r > T(1e-12) ? r : T(1e-12));
}

// The overlap's mutual information is value = s I(q) (losses/similarity.py, overlap_mi):
// s the overlap's share (the sum of the weighted joint histogram J over n), q = J / c,
// c = max(s, eps), I = -sum q log ratio. Its derivative with respect to one entry of J, from
// that entry's log ratio ``lr``: I + (s / c)(1 - lr) - [s > eps](1 + I), which is -lr where
// s > eps. Where the ratio is floored (an empty entry) the floor has no derivative, as in
// autograd through the op-by-op path: 2 - lr in place of 1 - lr.
template <typename T>
NR_HD T overlap_entry_grad(T lr, T info, T s, T eps) {
  const T c = s > eps ? s : eps;
  const T own = lr > nr_log(T(1e-12)) ? T(1) : T(2);
  return info + s / c * (own - lr) - (s > eps ? T(1) + info : T(0));
}

// The overlap's mutual information's gradients at one point: d value / d(warped value)
// into *g_x and d value / d weight into *g_weight, times grad / n (``grad_over_n``), from
// the row's ``entry_grad`` (overlap_entry_grad of each entry) and ``scale`` (lo, span of the warped
// sample, lo, span of the fixed one).
template <typename T>
NR_HD void overlap_mi_point_gradients(T x, T y, T weight, const T* scale, const T* entry_grad, T grad_over_n, int bins,
                                      T* g_x, T* g_weight) {
  int ia[3], ib[3];
  T wa[3], wb[3];
  spline_bins(x, scale[0], scale[1], bins, ia, wa);
  spline_bins(y, scale[2], scale[3], bins, ib, wb);
  T g[3], gw = T(0);
  for (int k = 0; k < 3; ++k) {
    T a = T(0);
    for (int k2 = 0; k2 < 3; ++k2) a += entry_grad[ia[k] * bins + ib[k2]] * wb[k2];
    g[k] = a * grad_over_n;
    gw += a * wa[k];
  }
  *g_weight = gw * grad_over_n;
  T d = wa[2] - wa[0];  // the offset from the bin's centre
  T gd = d * (g[0] - T(2) * g[1] + g[2]) + T(0.5) * (g[2] - g[0]);
  *g_x = gd * weight * T(bins - 3) / scale[1];
}

// Linear interpolation of a scalar volume (row-major, axis 0 slowest) at a voxel-index
// point, with the spatial gradient unless ``grad`` is null (values only); vertices outside
// the grid count as 0.
template <int D, typename T>
NR_HD T sample_with_gradient(const T* image, const int64_t* shape, const T* p, T* grad) {
  int64_t base[D];
  T f[D];
  for (int i = 0; i < D; ++i) {
    T fl = nr_floor(p[i]);
    base[i] = (int64_t)fl;
    f[i] = p[i] - fl;
    if (grad) grad[i] = T(0);
  }
  T value = T(0);
  for (int c = 0; c < (1 << D); ++c) {
    int64_t offset = 0;
    bool inside = true;
    for (int i = 0; i < D; ++i) {
      int64_t v = base[i] + ((c >> i) & 1);
      if (v < 0 || v >= shape[i]) inside = false;
      offset = offset * shape[i] + v;
    }
    if (!inside) continue;
    T val = image[offset];
    T w = T(1);
    for (int i = 0; i < D; ++i) w *= ((c >> i) & 1) ? f[i] : T(1) - f[i];
    value += w * val;
    if (!grad) continue;
    for (int i = 0; i < D; ++i) {
      T dw = ((c >> i) & 1) ? T(1) : T(-1);
      for (int k = 0; k < D; ++k)
        if (k != i) dw *= ((c >> k) & 1) ? f[k] : T(1) - f[k];
      grad[i] += dw * val;
    }
  }
  return value;
}

// Linear interpolation of a C-channel volume stored channel-last (row-major (*shape, C), so a
// vertex's C values are contiguous) at a voxel-index point: value[k] for k < C and, unless
// ``grad`` is null, grad[k * D + i] = d value[k] / d p[i]; vertices outside the grid count as 0.
// The corner weights and their derivatives are made once for all channels.
template <int D, typename T>
NR_HD void sample_channels_with_gradient(const T* image, const int64_t* shape, int64_t channels, const T* p, T* value,
                                         T* grad) {
  int64_t base[D];
  T f[D];
  for (int i = 0; i < D; ++i) {
    T fl = nr_floor(p[i]);
    base[i] = (int64_t)fl;
    f[i] = p[i] - fl;
  }
  for (int64_t k = 0; k < channels; ++k) value[k] = T(0);
  if (grad)
    for (int64_t k = 0; k < channels * D; ++k) grad[k] = T(0);
  for (int c = 0; c < (1 << D); ++c) {
    int64_t offset = 0;
    bool inside = true;
    for (int i = 0; i < D; ++i) {
      int64_t v = base[i] + ((c >> i) & 1);
      if (v < 0 || v >= shape[i]) inside = false;
      offset = offset * shape[i] + v;
    }
    if (!inside) continue;
    const T* val = image + offset * channels;
    T w = T(1);
    for (int i = 0; i < D; ++i) w *= ((c >> i) & 1) ? f[i] : T(1) - f[i];
    for (int64_t k = 0; k < channels; ++k) value[k] += w * val[k];
    if (!grad) continue;
    T dw[D];
    for (int i = 0; i < D; ++i) {
      dw[i] = ((c >> i) & 1) ? T(1) : T(-1);
      for (int j = 0; j < D; ++j)
        if (j != i) dw[i] *= ((c >> j) & 1) ? f[j] : T(1) - f[j];
    }
    for (int64_t k = 0; k < channels; ++k)
      for (int i = 0; i < D; ++i) grad[k * D + i] += dw[i] * val[k];
  }
}

}  // namespace nr
