// CPU twins of the CUDA kernels (hash grid forward / backward / double backward, encoding
// with Jacobian and its backward, fused warp), parallel with at::parallel_for, and their
// torch bindings: the ops of ops.h.
// Table gradients are race-free: levels own disjoint table rows, so they are split
// between threads by level.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "pointmath.h"

namespace {

struct Layout {
  std::vector<float> scales;
  std::vector<int64_t> resolutions, sizes, offsets;
  std::vector<uint8_t> hashed;  // not vector<bool>: a plain byte read per level and point
  int64_t n_levels() const { return (int64_t)scales.size(); }
};

Layout make_layout(const std::vector<double>& scales, const std::vector<int64_t>& resolutions,
                   const std::vector<int64_t>& sizes, const std::vector<int64_t>& offsets,
                   const std::vector<bool>& hashed) {
  Layout l;
  for (double s : scales) l.scales.push_back((float)s);
  l.resolutions = resolutions;
  l.sizes = sizes;
  l.offsets = offsets;
  l.hashed.assign(hashed.begin(), hashed.end());
  return l;
}

template <int D, typename T>
nr::Cell<D, T> cell_at(const T* x, const Layout& lay, int64_t level, bool smooth) {
  nr::Cell<D, T> cell;
  cell.setup(x, (T)lay.scales[level], (uint32_t)lay.resolutions[level], (uint32_t)lay.sizes[level],
             (uint32_t)lay.offsets[level], lay.hashed[level], smooth);
  return cell;
}

template <int D, int FC, typename T>
void forward_impl(const T* __restrict__ x, const T* __restrict__ table, T* __restrict__ y, int64_t n, int64_t F_, const Layout& lay, bool smooth) {
  const int64_t L = lay.n_levels();
  const int64_t F = FC > 0 ? FC : F_;  // compile-time for the common widths
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t l = 0; l < L; ++l) {
        auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
        T* out = y + (p * L + l) * F;
        for (int64_t f = 0; f < F; ++f) out[f] = T(0);
        for (int c = 0; c < (1 << D); ++c) {
          T w = cell.weight(c);
          const T* row = table + (int64_t)cell.rows[c] * F;
          for (int64_t f = 0; f < F; ++f) out[f] += w * row[f];
        }
      }
    }
  });
}

// gx[p, i] = sum_{l,c,f} gy[p,l,f] T[row,f] dw_c/dx_i ; gT[row,f] += w_c gy[p,l,f]
template <int D, int FC, typename T>
void backward_impl(const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ table, T* __restrict__ gx, T* __restrict__ gT, int64_t n, int64_t F_, const Layout& lay,
                   bool smooth) {
  const int64_t L = lay.n_levels();
  const int64_t F = FC > 0 ? FC : F_;  // compile-time for the common widths
  if (gx) {
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        T acc[D] = {};
        for (int64_t l = 0; l < L; ++l) {
          auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
          const T* g = gy + (p * L + l) * F;
          for (int c = 0; c < (1 << D); ++c) {
            const T* row = table + (int64_t)cell.rows[c] * F;
            T dot = T(0);
            for (int64_t f = 0; f < F; ++f) dot += g[f] * row[f];
            T w, dw[D];
            cell.corner(c, w, dw, nullptr);
            for (int i = 0; i < D; ++i) acc[i] += dot * dw[i];
          }
        }
        for (int i = 0; i < D; ++i) gx[p * D + i] = acc[i];
      }
    });
  }
  if (gT) {
    at::parallel_for(0, L, 1, [&](int64_t lbegin, int64_t lend) {
      for (int64_t l = lbegin; l < lend; ++l) {
        for (int64_t p = 0; p < n; ++p) {
          auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
          const T* g = gy + (p * L + l) * F;
          for (int c = 0; c < (1 << D); ++c) {
            T w = cell.weight(c);
            T* row = gT + (int64_t)cell.rows[c] * F;
            for (int64_t f = 0; f < F; ++f) row[f] += w * g[f];
          }
        }
      }
    });
  }
}

// Derivatives of (gx, gT) = backward(gy, x, T) against upstream (ggx, ggT):
//   g_gy[p,l,f] = sum_c w_c ggT[row,f] + sum_{c,i} ggx[p,i] T[row,f] dw_c/dx_i
//   g_x[p,j]    = sum_{l,c,f} gy[p,l,f] (ggT[row,f] dw_c/dx_j + T[row,f] sum_i ggx[p,i] d2w_c/dx_i dx_j)
//   g_T[row,f] += gy[p,l,f] sum_i dw_c/dx_i ggx[p,i]
template <int D, int FC, typename T>
void double_backward_impl(const T* __restrict__ ggx, const T* __restrict__ ggT, const T* __restrict__ gy, const T* __restrict__ x, const T* __restrict__ table, T* __restrict__ g_gy, T* __restrict__ g_x,
                          T* __restrict__ g_T, int64_t n, int64_t F_, const Layout& lay, bool smooth) {
  const int64_t L = lay.n_levels();
  const int64_t F = FC > 0 ? FC : F_;  // compile-time for the common widths
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T accx[D] = {};
      const T* gg = ggx ? ggx + p * D : nullptr;
      for (int64_t l = 0; l < L; ++l) {
        auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
        const T* g = gy + (p * L + l) * F;
        T* out = g_gy ? g_gy + (p * L + l) * F : nullptr;
        if (out)
          for (int64_t f = 0; f < F; ++f) out[f] = T(0);
        for (int c = 0; c < (1 << D); ++c) {
          const T* row = table + (int64_t)cell.rows[c] * F;
          const T* rowgg = ggT ? ggT + (int64_t)cell.rows[c] * F : nullptr;
          T w, dw[D], d2w[D][D];
          cell.corner(c, w, dw, d2w);
          T dw_dot_gg = T(0);
          if (gg)
            for (int i = 0; i < D; ++i) dw_dot_gg += dw[i] * gg[i];
          T g_row = T(0), g_rowgg = T(0);
          for (int64_t f = 0; f < F; ++f) {
            if (out) out[f] += (rowgg ? w * rowgg[f] : T(0)) + dw_dot_gg * row[f];
            g_row += g[f] * row[f];
            if (rowgg) g_rowgg += g[f] * rowgg[f];
          }
          if (g_x) {
            for (int j = 0; j < D; ++j) {
              T a = g_rowgg * dw[j];
              if (gg) {
                T h = T(0);
                for (int i = 0; i < D; ++i) h += gg[i] * d2w[i][j];
                a += g_row * h;
              }
              accx[j] += a;
            }
          }
        }
      }
      if (g_x)
        for (int j = 0; j < D; ++j) g_x[p * D + j] = accx[j];
    }
  });
  if (g_T && ggx) {
    at::parallel_for(0, L, 1, [&](int64_t lbegin, int64_t lend) {
      for (int64_t l = lbegin; l < lend; ++l) {
        for (int64_t p = 0; p < n; ++p) {
          auto cell = cell_at<D, T>(x + p * D, lay, l, smooth);
          const T* g = gy + (p * L + l) * F;
          const T* gg = ggx + p * D;
          for (int c = 0; c < (1 << D); ++c) {
            T w, dw[D];
            cell.corner(c, w, dw, nullptr);
            T s = T(0);
            for (int i = 0; i < D; ++i) s += dw[i] * gg[i];
            T* row = g_T + (int64_t)cell.rows[c] * F;
            for (int64_t f = 0; f < F; ++f) row[f] += s * g[f];
          }
        }
      }
    });
  }
}

// Encoding of the clamped points and its Jacobian rows along D directions, in one pass:
//   y[p, l F + f]           = enc(xc_p)
//   dirs[p, j, l F + f]     = sum_k m_p[j][k] d enc_{l F + f} / d xc_k     (p < n_jac)
// with xc = clamp(x, 0, 1) and m_p = dmat diag(inside_p) (pointmath.h): the rows of the
// Jacobian of enc(clamp(x)) along x = u dmat + b, i.e. with respect to u.
template <int D, int FC, typename T>
void forward_jacobian_impl(const T* __restrict__ x, const T* __restrict__ table, const T* __restrict__ dmat,
                           T* __restrict__ y, T* __restrict__ dirs, int64_t n, int64_t n_jac, int64_t F_,
                           const Layout& lay, bool smooth) {
  const int64_t L = lay.n_levels();
  const int64_t F = FC > 0 ? FC : F_;  // compile-time for the common widths
  const int64_t LF = L * F;
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T xc[D], inside[D], m[D][D], jl[8 * D];
      nr::clamp_point<D, T>(x + p * D, xc, inside);
      nr::direction_matrix<D, T>(dmat, inside, m);
      const bool with_dirs = p < n_jac;
      for (int64_t l = 0; l < L; ++l) {
        auto cell = cell_at<D, T>(xc, lay, l, smooth);
        T* out = y + p * LF + l * F;
        for (int64_t f = 0; f < F; ++f) out[f] = T(0);
        for (int64_t k = 0; k < F * D; ++k) jl[k] = T(0);
        for (int c = 0; c < (1 << D); ++c) {
          T w, dw[D];
          cell.corner(c, w, dw, nullptr);
          const T* row = table + (int64_t)cell.rows[c] * F;
          for (int64_t f = 0; f < F; ++f) {
            out[f] += w * row[f];
            if (with_dirs)
              for (int i = 0; i < D; ++i) jl[f * D + i] += dw[i] * row[f];
          }
        }
        if (!with_dirs) continue;
        for (int j = 0; j < D; ++j) {
          T* dout = dirs + (p * D + j) * LF + l * F;
          for (int64_t f = 0; f < F; ++f) {
            T a = T(0);
            for (int k = 0; k < D; ++k) a += m[j][k] * jl[f * D + k];
            dout[f] = a;
          }
        }
      }
    }
  });
}

// The gradient of point p's x-Jacobian rows at level l from that of its direction rows:
// G[f D + k] = sum_j gdirs[p, j, l F + f] m[j][k].
template <int D, typename T>
inline void jacobian_rows_grad(const T* gdirs, const T (*m)[D], int64_t p, int64_t l, int64_t F, int64_t LF, T* G) {
  for (int64_t f = 0; f < F; ++f)
    for (int k = 0; k < D; ++k) {
      T a = T(0);
      for (int j = 0; j < D; ++j) a += gdirs[(p * D + j) * LF + l * F + f] * m[j][k];
      G[f * D + k] = a;
    }
}

// One corner's share of g_x (before the clamp's mask): acc[j] += sum_f T[row,f] (gy[f] dw_j + sum_i G[f,i] d2w_ij).
template <int D, typename T>
inline void add_x_share(const T* row, const T* g, const T* G, const T* dw, const T (*d2w)[D], int64_t F,
                        bool with_dirs, T* acc) {
  for (int64_t f = 0; f < F; ++f)
    for (int j = 0; j < D; ++j) {
      T a = g[f] * dw[j];
      if (with_dirs)
        for (int i = 0; i < D; ++i) a += G[f * D + i] * d2w[i][j];
      acc[j] += row[f] * a;
    }
}

// Backward of (y, dirs) against (gy, gdirs), G as in jacobian_rows_grad (zero for p >= n_jac):
//   g_T[row,f] += w_c gy[p,l,f] + sum_i dw_c/dx_i G[f,i]
//   g_x[p,j]    = inside_j sum_{l,c,f} T[row,f] (gy[p,l,f] dw_c/dx_j + sum_i G[f,i] d2w_c/dx_i dx_j)
// g_T by levels (threads own levels: a level's rows of the table are its own). Where both
// are wanted and the levels outnumber the threads two to one, that pass also gives each
// point's share of g_x from each level (part[l][p], summed over the levels after): a point's
// cell, weights and their derivatives are computed once, not once per gradient. Otherwise
// g_x has a pass of its own, by points.
template <int D, int FC, typename T>
void jacobian_backward_impl(const T* __restrict__ gy, const T* __restrict__ gdirs, const T* __restrict__ x,
                            const T* __restrict__ table, const T* __restrict__ dmat, T* __restrict__ g_x,
                            T* __restrict__ g_T, int64_t n, int64_t n_jac, int64_t F_, const Layout& lay,
                            bool smooth) {
  const int64_t L = lay.n_levels();
  const int64_t F = FC > 0 ? FC : F_;  // compile-time for the common widths
  const int64_t LF = L * F;
  const bool x_by_levels = g_x && g_T && L >= 2 * at::get_num_threads();
  std::vector<T> part(x_by_levels ? L * n * D : 0);
  if (g_T) {
    at::parallel_for(0, L, 1, [&](int64_t lbegin, int64_t lend) {
      for (int64_t l = lbegin; l < lend; ++l) {
        for (int64_t p = 0; p < n; ++p) {
          T xc[D], inside[D], m[D][D], G[8 * D];
          nr::clamp_point<D, T>(x + p * D, xc, inside);
          const bool with_dirs = p < n_jac;
          if (with_dirs) {
            nr::direction_matrix<D, T>(dmat, inside, m);
            jacobian_rows_grad<D, T>(gdirs, m, p, l, F, LF, G);
          }
          auto cell = cell_at<D, T>(xc, lay, l, smooth);
          const T* g = gy + p * LF + l * F;
          T acc[D] = {};
          for (int c = 0; c < (1 << D); ++c) {
            T w, dw[D], d2w[D][D];
            cell.corner(c, w, dw, x_by_levels && with_dirs ? d2w : nullptr);
            T* grow = g_T + (int64_t)cell.rows[c] * F;
            for (int64_t f = 0; f < F; ++f) {
              T a = w * g[f];
              if (with_dirs)
                for (int i = 0; i < D; ++i) a += dw[i] * G[f * D + i];
              grow[f] += a;
            }
            if (x_by_levels) add_x_share<D, T>(table + (int64_t)cell.rows[c] * F, g, G, dw, d2w, F, with_dirs, acc);
          }
          if (x_by_levels)
            for (int j = 0; j < D; ++j) part[(l * n + p) * D + j] = acc[j];
        }
      }
    });
  }
  if (x_by_levels) {
    at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        T xc[D], inside[D];
        nr::clamp_point<D, T>(x + p * D, xc, inside);
        for (int j = 0; j < D; ++j) {
          T sum = T(0);
          for (int64_t l = 0; l < L; ++l) sum += part[(l * n + p) * D + j];
          g_x[p * D + j] = sum * inside[j];
        }
      }
    });
  } else if (g_x) {
    at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        T xc[D], inside[D], m[D][D], G[8 * D];
        nr::clamp_point<D, T>(x + p * D, xc, inside);
        nr::direction_matrix<D, T>(dmat, inside, m);
        const bool with_dirs = p < n_jac;
        T acc[D] = {};
        for (int64_t l = 0; l < L; ++l) {
          auto cell = cell_at<D, T>(xc, lay, l, smooth);
          const T* g = gy + p * LF + l * F;
          if (with_dirs) jacobian_rows_grad<D, T>(gdirs, m, p, l, F, LF, G);
          for (int c = 0; c < (1 << D); ++c) {
            T w, dw[D], d2w[D][D];
            cell.corner(c, w, dw, with_dirs ? d2w : nullptr);
            add_x_share<D, T>(table + (int64_t)cell.rows[c] * F, g, G, dw, d2w, F, with_dirs, acc);
          }
        }
        for (int j = 0; j < D; ++j) g_x[p * D + j] = acc[j] * inside[j];
      }
    });
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<torch::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

#define DISPATCH_DIMS(d, ...)                                   \
  if (d == 2) {                                                 \
    constexpr int D = 2;                                        \
    __VA_ARGS__;                                                \
  } else if (d == 3) {                                          \
    constexpr int D = 3;                                        \
    __VA_ARGS__;                                                \
  } else {                                                      \
    TORCH_CHECK(false, "hash grid supports 2 or 3 dimensions"); \
  }

// the hash-grid impls, with the features per level F a compile-time constant where it is 2
// (the default: the loops over features unroll), else read at run time (FC = 0)
#define DISPATCH_DIMS_F(d, F, ...)    \
  if (F == 2) {                       \
    constexpr int FC = 2;             \
    DISPATCH_DIMS(d, __VA_ARGS__);    \
  } else {                            \
    constexpr int FC = 0;             \
    DISPATCH_DIMS(d, __VA_ARGS__);    \
  }

void check_inputs(const torch::Tensor& x, const torch::Tensor& table) {
  TORCH_CHECK(x.device().is_cpu() && table.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.is_contiguous() && table.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(x.scalar_type() == table.scalar_type(), "x and table must share a dtype");
}

}  // namespace

torch::Tensor hashgrid_forward(torch::Tensor x, torch::Tensor table, std::vector<double> scales,
                               std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                               std::vector<int64_t> offsets, std::vector<bool> hashed, bool smooth) {
  check_inputs(x, table);
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0), F = table.size(1), d = x.size(1);
  auto y = torch::empty({n, lay.n_levels() * F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward", [&] {
    DISPATCH_DIMS_F(d, F, forward_impl<D, FC, scalar_t>(x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
                                               y.data_ptr<scalar_t>(), n, F, lay, smooth));
  });
  return y;
}

std::vector<torch::Tensor> hashgrid_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor table,
                                             std::vector<double> scales, std::vector<int64_t> resolutions,
                                             std::vector<int64_t> sizes, std::vector<int64_t> offsets,
                                             std::vector<bool> hashed, bool smooth, bool need_x, bool need_table) {
  check_inputs(x, table);
  gy = gy.contiguous();
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0), F = table.size(1), d = x.size(1);
  torch::Tensor gx = need_x ? torch::empty_like(x) : torch::Tensor();
  torch::Tensor gT = need_table ? torch::zeros_like(table) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_backward", [&] {
    DISPATCH_DIMS_F(d, F, backward_impl<D, FC, scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                table.data_ptr<scalar_t>(),
                                                need_x ? gx.data_ptr<scalar_t>() : nullptr,
                                                need_table ? gT.data_ptr<scalar_t>() : nullptr, n, F, lay, smooth));
  });
  return {gx, gT};
}

std::vector<torch::Tensor> hashgrid_double_backward(c10::optional<torch::Tensor> ggx, c10::optional<torch::Tensor> ggT,
                                                    torch::Tensor gy, torch::Tensor x, torch::Tensor table,
                                                    std::vector<double> scales, std::vector<int64_t> resolutions,
                                                    std::vector<int64_t> sizes, std::vector<int64_t> offsets,
                                                    std::vector<bool> hashed, bool smooth, bool need_gy, bool need_x,
                                                    bool need_table) {
  check_inputs(x, table);
  gy = gy.contiguous();
  if (ggx.has_value() && ggx->defined()) ggx = ggx->contiguous();
  if (ggT.has_value() && ggT->defined()) ggT = ggT->contiguous();
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0), F = table.size(1), d = x.size(1);
  torch::Tensor g_gy = need_gy ? torch::empty_like(gy) : torch::Tensor();
  torch::Tensor g_x = need_x ? torch::empty_like(x) : torch::Tensor();
  torch::Tensor g_T = need_table ? torch::zeros_like(table) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_double_backward", [&] {
    DISPATCH_DIMS_F(d, F, double_backward_impl<D, FC, scalar_t>(
                         ptr_or_null<scalar_t>(ggx), ptr_or_null<scalar_t>(ggT), gy.data_ptr<scalar_t>(),
                         x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
                         need_gy ? g_gy.data_ptr<scalar_t>() : nullptr, need_x ? g_x.data_ptr<scalar_t>() : nullptr,
                         need_table ? g_T.data_ptr<scalar_t>() : nullptr, n, F, lay, smooth));
  });
  return {g_gy, g_x, g_T};
}

std::vector<torch::Tensor> hashgrid_forward_jacobian(torch::Tensor x, torch::Tensor table, torch::Tensor directions,
                                                     int64_t n_jacobian, std::vector<double> scales,
                                                     std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                                                     std::vector<int64_t> offsets, std::vector<bool> hashed,
                                                     bool smooth) {
  check_inputs(x, table);
  nr_check_directions(x, directions, n_jacobian);
  directions = directions.contiguous();
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0), F = table.size(1), d = x.size(1);
  TORCH_CHECK(F <= 8, "at most 8 features per level");
  auto y = torch::empty({n, lay.n_levels() * F}, x.options());
  auto dirs = torch::empty({n_jacobian, d, lay.n_levels() * F}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward_jacobian", [&] {
    DISPATCH_DIMS_F(d, F, forward_jacobian_impl<D, FC, scalar_t>(
                         x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), directions.data_ptr<scalar_t>(),
                         y.data_ptr<scalar_t>(), dirs.data_ptr<scalar_t>(), n, n_jacobian, F, lay, smooth));
  });
  return {y, dirs};
}

std::vector<torch::Tensor> hashgrid_jacobian_backward(torch::Tensor gy, torch::Tensor gdirs, torch::Tensor x,
                                                      torch::Tensor table, torch::Tensor directions,
                                                      int64_t n_jacobian, std::vector<double> scales,
                                                      std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                                                      std::vector<int64_t> offsets, std::vector<bool> hashed,
                                                      bool smooth, bool need_x, bool need_table) {
  check_inputs(x, table);
  nr_check_directions(x, directions, n_jacobian);
  directions = directions.contiguous();
  gy = gy.contiguous();
  gdirs = gdirs.contiguous();
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0), F = table.size(1), d = x.size(1);
  TORCH_CHECK(F <= 8, "at most 8 features per level");
  TORCH_CHECK(gdirs.numel() == n_jacobian * d * lay.n_levels() * F, "gdirs must be (n_jacobian, d, L F)");
  torch::Tensor g_x = need_x ? torch::empty_like(x) : torch::Tensor();
  torch::Tensor g_T = need_table ? torch::zeros_like(table) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_jacobian_backward", [&] {
    DISPATCH_DIMS_F(d, F, jacobian_backward_impl<D, FC, scalar_t>(
                         gy.data_ptr<scalar_t>(), gdirs.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                         table.data_ptr<scalar_t>(), directions.data_ptr<scalar_t>(),
                         need_x ? g_x.data_ptr<scalar_t>() : nullptr, need_table ? g_T.data_ptr<scalar_t>() : nullptr,
                         n, n_jacobian, F, lay, smooth));
  });
  return {g_x, g_T};
}

// Fused warp: values (N) and spatial gradients (N, d) of a volume at voxel-index points.
std::vector<torch::Tensor> warp_forward(torch::Tensor image, torch::Tensor points, bool with_gradient) {
  TORCH_CHECK(image.device().is_cpu() && points.device().is_cpu(), "CPU tensors expected");
  image = image.contiguous();
  points = points.contiguous();
  TORCH_CHECK(image.scalar_type() == points.scalar_type(), "image and points must share a dtype");
  const int64_t d = points.size(1), n = points.size(0);
  TORCH_CHECK(image.dim() == d || image.dim() == d + 1,
              "image must be (*spatial) or channel-last (*spatial, C), spatial matching the points");
  const bool channels = image.dim() == d + 1;
  const int64_t C = channels ? image.size(d) : 1;
  auto values = channels ? torch::empty({n, C}, points.options()) : torch::empty({n}, points.options());
  auto grads = !with_gradient ? torch::Tensor()
               : channels     ? torch::empty({n, C, d}, points.options())
                              : torch::empty({n, d}, points.options());
  std::vector<int64_t> shape(image.sizes().begin(), image.sizes().begin() + d);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "warp_forward", [&] {
    const scalar_t* img = image.data_ptr<scalar_t>();
    const scalar_t* pts = points.data_ptr<scalar_t>();
    scalar_t* val = values.data_ptr<scalar_t>();
    scalar_t* grd = with_gradient ? grads.data_ptr<scalar_t>() : nullptr;
    if (channels) {
      DISPATCH_DIMS(d, at::parallel_for(0, n, 512, [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p)
          nr::sample_channels_with_gradient<D, scalar_t>(img, shape.data(), C, pts + p * D, val + p * C,
                                                          grd ? grd + p * C * D : nullptr);
      }));
    } else {
      DISPATCH_DIMS(d, at::parallel_for(0, n, 2048, [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p)
          val[p] = nr::sample_with_gradient<D, scalar_t>(img, shape.data(), pts + p * D, grd ? grd + p * D : nullptr);
      }));
    }
  });
  return {values, grads};
}

namespace {

void check_mi(const torch::Tensor& warped, const torch::Tensor& fixed, int64_t bins) {
  TORCH_CHECK(warped.device().is_cpu() && fixed.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(warped.dim() == 2 && warped.sizes() == fixed.sizes(), "warped and fixed must be (B, N) alike");
  TORCH_CHECK(warped.scalar_type() == fixed.scalar_type(), "warped and fixed must share a dtype");
  TORCH_CHECK(bins >= 4, "at least 4 bins");
}

// One batch row per task: its range, histogram, marginals and entropies in sequence.
template <typename T>
void mi_forward_impl(const T* w, const T* f, T* value, T* log_ratio, T* scale, int64_t B, int64_t n, int bins, T eps) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> joint(bins * bins), pa(bins), pb(bins);
    for (int64_t b = b0; b < b1; ++b) {
      const T* x = w + b * n;
      const T* y = f + b * n;
      T* sc = scale + b * 4;
      nr::sample_range(x, n, eps, sc, sc + 1);
      nr::sample_range(y, n, eps, sc + 2, sc + 3);
      std::fill(joint.begin(), joint.end(), T(0));
      for (int64_t p = 0; p < n; ++p) {
        int entry[9];
        T product[9];
        nr::joint_entries(x[p], y[p], sc, bins, entry, product);
        for (int k = 0; k < 9; ++k) joint[entry[k]] += product[k];
      }
      for (auto& e : joint) e /= T(n);
      std::fill(pa.begin(), pa.end(), T(0));
      std::fill(pb.begin(), pb.end(), T(0));
      for (int i = 0; i < bins; ++i)
        for (int j = 0; j < bins; ++j) {
          pa[i] += joint[i * bins + j];
          pb[j] += joint[i * bins + j];
        }
      T v = T(0);
      T* lr = log_ratio + b * bins * bins;
      for (int i = 0; i < bins; ++i)
        for (int j = 0; j < bins; ++j) {
          T den = pa[i] * pb[j];
          den = den > T(1e-12) ? den : T(1e-12);
          T r = joint[i * bins + j] / den;
          lr[i * bins + j] = nr::nr_log(r > T(1e-12) ? r : T(1e-12));
          v -= joint[i * bins + j] * lr[i * bins + j];
        }
      value[b] = v;
    }
  });
}

}  // namespace

std::vector<torch::Tensor> mi_forward(torch::Tensor warped, torch::Tensor fixed, int64_t bins, double eps) {
  check_mi(warped, fixed, bins);
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  const int64_t B = warped.size(0), n = warped.size(1);
  TORCH_CHECK(n > 0, "empty samples");
  auto value = torch::empty({B}, warped.options());
  auto log_ratio = torch::empty({B, bins, bins}, warped.options());
  auto scale = torch::empty({B, 4}, warped.options());
  AT_DISPATCH_FLOATING_TYPES(warped.scalar_type(), "mi_forward", [&] {
    mi_forward_impl<scalar_t>(warped.data_ptr<scalar_t>(), fixed.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                              log_ratio.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), B, n, (int)bins,
                              (scalar_t)eps);
  });
  return {value, log_ratio, scale};
}

torch::Tensor mi_backward(torch::Tensor grad, torch::Tensor warped, torch::Tensor fixed, torch::Tensor scale,
                          torch::Tensor log_ratio, int64_t bins) {
  check_mi(warped, fixed, bins);
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  grad = grad.contiguous();
  scale = scale.contiguous();
  log_ratio = log_ratio.contiguous();
  const int64_t B = warped.size(0), n = warped.size(1);
  auto g = torch::empty_like(warped);
  AT_DISPATCH_FLOATING_TYPES(warped.scalar_type(), "mi_backward", [&] {
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* x = warped.data_ptr<scalar_t>();
    const scalar_t* y = fixed.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* lr = log_ratio.data_ptr<scalar_t>();
    scalar_t* out = g.data_ptr<scalar_t>();
    at::parallel_for(0, B * n, 2048, [&](int64_t s, int64_t e) {
      for (int64_t q = s; q < e; ++q) {
        const int64_t b = q / n;
        out[q] = nr::mi_point_gradient<scalar_t>(x[q], y[q], sc + b * 4, lr + b * bins * bins, gr[b] / scalar_t(n),
                                                 (int)bins);
      }
    });
  });
  return g;
}

namespace {

void check_overlap_mi(const torch::Tensor& warped, const torch::Tensor& fixed, const torch::Tensor& weight,
                      int64_t bins) {
  check_mi(warped, fixed, bins);
  TORCH_CHECK(weight.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(weight.sizes() == warped.sizes(), "weight must be (B, N) as warped");
  TORCH_CHECK(weight.scalar_type() == warped.scalar_type(), "warped and weight must share a dtype");
}

// One batch row per task: the counted ranges, the weighted histogram, the marginals, the
// log ratios, the value and each entry's gradient (pointmath.h: overlap_entry_grad).
template <typename T>
void overlap_mi_forward_impl(const T* w, const T* f, const T* weight, T* value, T* entry_grad, T* scale, int64_t B,
                             int64_t n, int bins, T eps) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> joint(bins * bins), pa(bins), pb(bins);
    for (int64_t b = b0; b < b1; ++b) {
      const T* x = w + b * n;
      const T* y = f + b * n;
      const T* m = weight + b * n;
      T* sc = scale + b * 4;
      nr::counted_range(x, m, n, eps, sc, sc + 1);
      nr::counted_range(y, m, n, eps, sc + 2, sc + 3);
      std::fill(joint.begin(), joint.end(), T(0));
      for (int64_t p = 0; p < n; ++p) {
        int entry[9];
        T product[9];
        nr::joint_entries(x[p], y[p], sc, bins, entry, product);
        for (int k = 0; k < 9; ++k) joint[entry[k]] += m[p] * product[k];
      }
      T s = T(0);
      for (auto& e : joint) s += e;
      s /= T(n);
      const T norm = T(1) / (T(n) * (s > eps ? s : eps));  // joint -> q
      std::fill(pa.begin(), pa.end(), T(0));
      std::fill(pb.begin(), pb.end(), T(0));
      for (int i = 0; i < bins; ++i)
        for (int j = 0; j < bins; ++j) {
          pa[i] += joint[i * bins + j] * norm;
          pb[j] += joint[i * bins + j] * norm;
        }
      T info = T(0);
      T* g = entry_grad + b * bins * bins;
      for (int i = 0; i < bins; ++i)
        for (int j = 0; j < bins; ++j) {
          const T q = joint[i * bins + j] * norm;
          g[i * bins + j] = nr::mi_log_ratio(q, pa[i], pb[j]);
          info -= q * g[i * bins + j];
        }
      for (int e = 0; e < bins * bins; ++e) g[e] = nr::overlap_entry_grad(g[e], info, s, eps);
      value[b] = s * info;
    }
  });
}

}  // namespace

std::vector<torch::Tensor> overlap_mi_forward(torch::Tensor warped, torch::Tensor fixed, torch::Tensor weight,
                                              int64_t bins, double eps) {
  check_overlap_mi(warped, fixed, weight, bins);
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  weight = weight.contiguous();
  const int64_t B = warped.size(0), n = warped.size(1);
  TORCH_CHECK(n > 0, "empty samples");
  auto value = torch::empty({B}, warped.options());
  auto entry_grad = torch::empty({B, bins, bins}, warped.options());
  auto scale = torch::empty({B, 4}, warped.options());
  AT_DISPATCH_FLOATING_TYPES(warped.scalar_type(), "overlap_mi_forward", [&] {
    overlap_mi_forward_impl<scalar_t>(warped.data_ptr<scalar_t>(), fixed.data_ptr<scalar_t>(),
                                      weight.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                                      entry_grad.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), B, n, (int)bins,
                                      (scalar_t)eps);
  });
  return {value, entry_grad, scale};
}

std::vector<torch::Tensor> overlap_mi_backward(torch::Tensor grad, torch::Tensor warped, torch::Tensor fixed,
                                               torch::Tensor weight, torch::Tensor scale, torch::Tensor entry_grad,
                                               int64_t bins) {
  check_overlap_mi(warped, fixed, weight, bins);
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  weight = weight.contiguous();
  grad = grad.contiguous();
  scale = scale.contiguous();
  entry_grad = entry_grad.contiguous();
  const int64_t B = warped.size(0), n = warped.size(1);
  auto g_w = torch::empty_like(warped);
  auto g_weight = torch::empty_like(warped);
  AT_DISPATCH_FLOATING_TYPES(warped.scalar_type(), "overlap_mi_backward", [&] {
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    const scalar_t* x = warped.data_ptr<scalar_t>();
    const scalar_t* y = fixed.data_ptr<scalar_t>();
    const scalar_t* m = weight.data_ptr<scalar_t>();
    const scalar_t* sc = scale.data_ptr<scalar_t>();
    const scalar_t* eg = entry_grad.data_ptr<scalar_t>();
    scalar_t* out_w = g_w.data_ptr<scalar_t>();
    scalar_t* out_m = g_weight.data_ptr<scalar_t>();
    at::parallel_for(0, B * n, 2048, [&](int64_t s, int64_t e) {
      for (int64_t q = s; q < e; ++q) {
        const int64_t b = q / n;
        nr::overlap_mi_point_gradients<scalar_t>(x[q], y[q], m[q], sc + b * 4, eg + b * bins * bins,
                                                 gr[b] / scalar_t(n), (int)bins, out_w + q, out_m + q);
      }
    });
  });
  return {g_w, g_weight};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { NR_OPS(NR_BIND_OP) }
