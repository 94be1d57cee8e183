// The one op table of the native kernels. Both torch bindings (native_cpu.cpp and
// native_cuda.cpp, the latter also compiled as host C++ by native_emulated.cpp) declare
// their ops from this header and bind them with NR_OPS(NR_BIND_OP): an op missing from one
// twin is an undefined symbol when that module loads, never an AttributeError in a run.
#pragma once
#include <torch/extension.h>

#include <vector>

#define NR_OPS(X)                \
  X(hashgrid_forward)            \
  X(hashgrid_backward)           \
  X(hashgrid_double_backward)    \
  X(hashgrid_forward_jacobian)   \
  X(hashgrid_jacobian_backward)  \
  X(warp_forward)                \
  X(mi_forward)                  \
  X(mi_backward)                 \
  X(overlap_mi_forward)          \
  X(overlap_mi_backward)

#define NR_BIND_OP(name) m.def(#name, &name);

// The Jacobian kernels' directions (d, d) and count of points with rows, checked alike by
// both bindings.
inline void nr_check_directions(const torch::Tensor& x, const torch::Tensor& directions, int64_t n_jacobian) {
  const int64_t d = x.size(1);
  TORCH_CHECK(directions.dim() == 2 && directions.size(0) == d && directions.size(1) == d,
              "directions must be (d, d)");
  TORCH_CHECK(directions.scalar_type() == x.scalar_type(), "x and directions must share a dtype");
  TORCH_CHECK(n_jacobian >= 0 && n_jacobian <= x.size(0), "n_jacobian must be within [0, N]");
}

#define NR_LAYOUT_ARGS                                                                                  \
  std::vector<double> scales, std::vector<int64_t> resolutions, std::vector<int64_t> sizes,            \
      std::vector<int64_t> offsets, std::vector<bool> hashed, bool smooth

// Encoding y (N, L*F) of points x (N, d) in [0,1]^d with table (rows, F).
torch::Tensor hashgrid_forward(torch::Tensor x, torch::Tensor table, NR_LAYOUT_ARGS);
// (gx (N, d), gT (rows, F)) from gy (N, L*F); undefined tensors where not needed.
std::vector<torch::Tensor> hashgrid_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor table, NR_LAYOUT_ARGS,
                                             bool need_x, bool need_table);
// (g_gy, g_x, g_T): the backward of hashgrid_backward against upstream (ggx, ggT).
std::vector<torch::Tensor> hashgrid_double_backward(c10::optional<torch::Tensor> ggx, c10::optional<torch::Tensor> ggT,
                                                    torch::Tensor gy, torch::Tensor x, torch::Tensor table,
                                                    NR_LAYOUT_ARGS, bool need_gy, bool need_x, bool need_table);
// (y (N, L*F), dirs (n_jacobian, d, L*F)) in one pass, of the points clamped to [0, 1]^d:
// dirs[p, j] = sum_k directions[j, k] inside_k d y_p / d xc_k, the Jacobian's rows along the
// directions (rows of A^T where x = u A^T + b: the derivatives with respect to u), for the
// first n_jacobian points; inside_k = 1 where 0 <= x_k <= 1 (the clamp's derivative).
std::vector<torch::Tensor> hashgrid_forward_jacobian(torch::Tensor x, torch::Tensor table, torch::Tensor directions,
                                                     int64_t n_jacobian, NR_LAYOUT_ARGS);
// (g_x (N, d), g_T) from (gy, gdirs), the gradients of hashgrid_forward_jacobian's two
// outputs; g_x with respect to the unclamped points (zero where a coordinate is clamped).
std::vector<torch::Tensor> hashgrid_jacobian_backward(torch::Tensor gy, torch::Tensor gdirs, torch::Tensor x,
                                                      torch::Tensor table, torch::Tensor directions,
                                                      int64_t n_jacobian, NR_LAYOUT_ARGS, bool need_x,
                                                      bool need_table);
// Fused warp: (values (N), spatial gradients (N, d)) of an image (*spatial) at voxel-index
// points; of a channel-last image (*spatial, C): (values (N, C), gradients (N, C, d)). The
// gradients undefined (not computed) unless with_gradient.
std::vector<torch::Tensor> warp_forward(torch::Tensor image, torch::Tensor points, bool with_gradient);
// Negative mutual information of B pairs of samples (warped, fixed) (B, N), each pair's
// from its own joint Parzen histogram (bins x bins, quadratic B-spline windows over each
// sample's own range, nine entries a point: losses/similarity.py, mi): (value (B),
// log_ratio (B, bins, bins) = log(p_ij / (p_i p_j)) floored at 1e-12, scale (B, 4) = lo and
// span of the warped sample, lo and span of the fixed one; span = max(hi - lo, eps)).
std::vector<torch::Tensor> mi_forward(torch::Tensor warped, torch::Tensor fixed, int64_t bins, double eps);
// d(-MI)/d warped (B, N), times grad (B,), from mi_forward's scale and log_ratio.
torch::Tensor mi_backward(torch::Tensor grad, torch::Tensor warped, torch::Tensor fixed, torch::Tensor scale,
                          torch::Tensor log_ratio, int64_t bins);
// The overlap's mutual information (losses/similarity.py, overlap_mi) of B pairs of samples
// (warped, fixed) (B, N) with weights (B, N) in [0, 1]: each row's joint histogram weighted,
// both samples' ranges over the points of weight > 0, value = s * (-MI of the normalized
// histogram), s = the mean weight. Returns (value (B), entry_grad (B, bins, bins) = d value /
// d(joint entry), scale (B, 4) as mi_forward's).
std::vector<torch::Tensor> overlap_mi_forward(torch::Tensor warped, torch::Tensor fixed, torch::Tensor weight,
                                              int64_t bins, double eps);
// (d value / d warped, d value / d weight) (B, N) each, times grad (B,), from
// overlap_mi_forward's scale and entry_grad.
std::vector<torch::Tensor> overlap_mi_backward(torch::Tensor grad, torch::Tensor warped, torch::Tensor fixed,
                                               torch::Tensor weight, torch::Tensor scale, torch::Tensor entry_grad,
                                               int64_t bins);
