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

}  // namespace nr
