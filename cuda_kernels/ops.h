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
  X(warp_forward)

#define NR_BIND_OP(name) m.def(#name, &name);

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
// (y (N, L*F), dy/dx (N, L*F, d)) in one pass.
std::vector<torch::Tensor> hashgrid_forward_jacobian(torch::Tensor x, torch::Tensor table, NR_LAYOUT_ARGS);
// (g_x, g_T) from (gy, gjac), the gradients of hashgrid_forward_jacobian's two outputs.
std::vector<torch::Tensor> hashgrid_jacobian_backward(torch::Tensor gy, torch::Tensor gjac, torch::Tensor x,
                                                      torch::Tensor table, NR_LAYOUT_ARGS, bool need_x,
                                                      bool need_table);
// Fused warp: (values (N), spatial gradients (N, d)) of an image at voxel-index points; the
// gradients undefined (not computed) unless with_gradient.
std::vector<torch::Tensor> warp_forward(torch::Tensor image, torch::Tensor points, bool with_gradient);
