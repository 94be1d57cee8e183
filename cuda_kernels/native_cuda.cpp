// Torch binding of the CUDA kernels (hashgrid.cu, warp.cu, mi.cu): the ops of ops.h, as
// native_cpu.cpp. Built on first use by neuralreg/native.py when torch has CUDA and nvcc
// exists; native_emulated.cpp compiles this file and the kernels as host C++ (CPU tensors,
// NR_EMULATE_CUDA), which is how CI runs the CUDA kernels without a GPU.
#include <torch/extension.h>

#include <vector>

#include "cuda_compat.h"
#include "launchers.h"
#include "layout.h"
#include "ops.h"

#if defined(NR_EMULATE_CUDA)
#define NR_STREAM nullptr
#define NR_DEVICE_GUARD(t)
#define NR_ON_DEVICE(t) (t).device().is_cpu()
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// the tensor's device made current, and torch's current stream on it: the kernels run on
// the tensors' GPU and queue behind torch's own work there
#define NR_DEVICE_GUARD(t) const c10::cuda::CUDAGuard nr_device_guard((t).device())
#define NR_STREAM (c10::cuda::getCurrentCUDAStream().stream())
#define NR_ON_DEVICE(t) (t).is_cuda()
#endif


namespace {

nr::LevelLayout make_layout(const std::vector<double>& scales, const std::vector<int64_t>& resolutions,
                            const std::vector<int64_t>& sizes, const std::vector<int64_t>& offsets,
                            const std::vector<bool>& hashed) {
  TORCH_CHECK((int)scales.size() <= nr::kMaxLevels, "at most 32 levels");
  nr::LevelLayout l{};
  l.n_levels = (int)scales.size();
  for (int i = 0; i < l.n_levels; ++i) {
    l.scales[i] = (float)scales[i];
    l.resolutions[i] = (uint32_t)resolutions[i];
    l.sizes[i] = (uint32_t)sizes[i];
    l.offsets[i] = (uint32_t)offsets[i];
    l.hashed[i] = hashed[i];
  }
  return l;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(NR_ON_DEVICE(t) && t.is_contiguous(), name, " must be a contiguous tensor on the kernels' device");
}

template <typename T>
T* ptr_if(bool need, torch::Tensor& t) {
  return need ? t.data_ptr<T>() : nullptr;
}

template <typename T>
const T* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

void check_status(int status) { TORCH_CHECK(status == 0, "CUDA kernel launch failed with error ", status); }

}  // namespace

torch::Tensor hashgrid_forward(torch::Tensor x, torch::Tensor table, std::vector<double> scales,
                               std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                               std::vector<int64_t> offsets, std::vector<bool> hashed, bool smooth) {
  check(x, "x");
  check(table, "table");
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0);
  const int F = (int)table.size(1), d = (int)x.size(1);
  auto y = torch::empty({n, lay.n_levels * F}, x.options());
  NR_DEVICE_GUARD(x);
  auto stream = NR_STREAM;
  if (x.scalar_type() == torch::kFloat64)
    check_status(nr_hashgrid_forward_f64(d, x.data_ptr<double>(), table.data_ptr<double>(), y.data_ptr<double>(), n,
                                         F, &lay, smooth, stream));
  else
    check_status(nr_hashgrid_forward_f32(d, x.data_ptr<float>(), table.data_ptr<float>(), y.data_ptr<float>(), n, F,
                                         &lay, smooth, stream));
  return y;
}

std::vector<torch::Tensor> hashgrid_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor table,
                                             std::vector<double> scales, std::vector<int64_t> resolutions,
                                             std::vector<int64_t> sizes, std::vector<int64_t> offsets,
                                             std::vector<bool> hashed, bool smooth, bool need_x, bool need_table) {
  gy = gy.contiguous();
  check(gy, "gy");
  check(x, "x");
  check(table, "table");
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0);
  const int F = (int)table.size(1), d = (int)x.size(1);
  auto gx = torch::zeros_like(x);
  auto gT = torch::zeros_like(table);
  NR_DEVICE_GUARD(x);
  auto stream = NR_STREAM;
  if (x.scalar_type() == torch::kFloat64)
    check_status(nr_hashgrid_backward_f64(d, gy.data_ptr<double>(), x.data_ptr<double>(), table.data_ptr<double>(),
                                          need_x ? gx.data_ptr<double>() : nullptr,
                                          need_table ? gT.data_ptr<double>() : nullptr, n, F, &lay, smooth, stream));
  else
    check_status(nr_hashgrid_backward_f32(d, gy.data_ptr<float>(), x.data_ptr<float>(), table.data_ptr<float>(),
                                          need_x ? gx.data_ptr<float>() : nullptr,
                                          need_table ? gT.data_ptr<float>() : nullptr, n, F, &lay, smooth, stream));
  return {gx, gT};
}

std::vector<torch::Tensor> hashgrid_double_backward(c10::optional<torch::Tensor> ggx, c10::optional<torch::Tensor> ggT,
                                                    torch::Tensor gy, torch::Tensor x, torch::Tensor table,
                                                    std::vector<double> scales, std::vector<int64_t> resolutions,
                                                    std::vector<int64_t> sizes, std::vector<int64_t> offsets,
                                                    std::vector<bool> hashed, bool smooth, bool need_gy, bool need_x,
                                                    bool need_table) {
  gy = gy.contiguous();
  if (ggx.has_value() && ggx->defined()) ggx = ggx->contiguous();
  if (ggT.has_value() && ggT->defined()) ggT = ggT->contiguous();
  check(gy, "gy");
  check(x, "x");
  check(table, "table");
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0);
  const int F = (int)table.size(1), d = (int)x.size(1);
  auto g_gy = torch::zeros_like(gy);
  auto g_x = torch::zeros_like(x);
  auto g_T = torch::zeros_like(table);
  NR_DEVICE_GUARD(x);
  auto stream = NR_STREAM;
  if (x.scalar_type() == torch::kFloat64)
    check_status(nr_hashgrid_double_backward_f64(
        d, opt_ptr<double>(ggx), opt_ptr<double>(ggT), gy.data_ptr<double>(), x.data_ptr<double>(),
        table.data_ptr<double>(), need_gy ? g_gy.data_ptr<double>() : nullptr,
        need_x ? g_x.data_ptr<double>() : nullptr, need_table ? g_T.data_ptr<double>() : nullptr, n, F, &lay, smooth,
        stream));
  else
    check_status(nr_hashgrid_double_backward_f32(
        d, opt_ptr<float>(ggx), opt_ptr<float>(ggT), gy.data_ptr<float>(), x.data_ptr<float>(),
        table.data_ptr<float>(), need_gy ? g_gy.data_ptr<float>() : nullptr, need_x ? g_x.data_ptr<float>() : nullptr,
        need_table ? g_T.data_ptr<float>() : nullptr, n, F, &lay, smooth, stream));
  return {g_gy, g_x, g_T};
}

std::vector<torch::Tensor> hashgrid_forward_jacobian(torch::Tensor x, torch::Tensor table, torch::Tensor directions,
                                                     int64_t n_jacobian, std::vector<double> scales,
                                                     std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                                                     std::vector<int64_t> offsets, std::vector<bool> hashed,
                                                     bool smooth) {
  directions = directions.contiguous();
  check(x, "x");
  check(table, "table");
  check(directions, "directions");
  nr_check_directions(x, directions, n_jacobian);
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0);
  const int F = (int)table.size(1), d = (int)x.size(1);
  TORCH_CHECK(F <= 8, "at most 8 features per level");
  auto y = torch::empty({n, lay.n_levels * F}, x.options());
  auto dirs = torch::empty({n_jacobian, d, lay.n_levels * F}, x.options());
  NR_DEVICE_GUARD(x);
  auto stream = NR_STREAM;
  if (x.scalar_type() == torch::kFloat64)
    check_status(nr_hashgrid_forward_jacobian_f64(d, x.data_ptr<double>(), table.data_ptr<double>(),
                                                  directions.data_ptr<double>(), y.data_ptr<double>(),
                                                  dirs.data_ptr<double>(), n, n_jacobian, F, &lay, smooth, stream));
  else
    check_status(nr_hashgrid_forward_jacobian_f32(d, x.data_ptr<float>(), table.data_ptr<float>(),
                                                  directions.data_ptr<float>(), y.data_ptr<float>(),
                                                  dirs.data_ptr<float>(), n, n_jacobian, F, &lay, smooth, stream));
  return {y, dirs};
}

std::vector<torch::Tensor> hashgrid_jacobian_backward(torch::Tensor gy, torch::Tensor gdirs, torch::Tensor x,
                                                      torch::Tensor table, torch::Tensor directions,
                                                      int64_t n_jacobian, std::vector<double> scales,
                                                      std::vector<int64_t> resolutions, std::vector<int64_t> sizes,
                                                      std::vector<int64_t> offsets, std::vector<bool> hashed,
                                                      bool smooth, bool need_x, bool need_table) {
  gy = gy.contiguous();
  gdirs = gdirs.contiguous();
  directions = directions.contiguous();
  check(gy, "gy");
  check(gdirs, "gdirs");
  check(x, "x");
  check(table, "table");
  check(directions, "directions");
  nr_check_directions(x, directions, n_jacobian);
  auto lay = make_layout(scales, resolutions, sizes, offsets, hashed);
  const int64_t n = x.size(0);
  const int F = (int)table.size(1), d = (int)x.size(1);
  TORCH_CHECK(F <= 8, "at most 8 features per level");
  TORCH_CHECK(gdirs.numel() == n_jacobian * d * lay.n_levels * F, "gdirs must be (n_jacobian, d, L F)");
  auto g_x = need_x ? torch::zeros_like(x) : torch::Tensor();
  auto g_T = need_table ? torch::zeros_like(table) : torch::Tensor();
  NR_DEVICE_GUARD(x);
  auto stream = NR_STREAM;
  if (x.scalar_type() == torch::kFloat64)
    check_status(nr_hashgrid_jacobian_backward_f64(d, gy.data_ptr<double>(), gdirs.data_ptr<double>(),
                                                   x.data_ptr<double>(), table.data_ptr<double>(),
                                                   directions.data_ptr<double>(), ptr_if<double>(need_x, g_x),
                                                   ptr_if<double>(need_table, g_T), n, n_jacobian, F, &lay, smooth,
                                                   stream));
  else
    check_status(nr_hashgrid_jacobian_backward_f32(d, gy.data_ptr<float>(), gdirs.data_ptr<float>(),
                                                   x.data_ptr<float>(), table.data_ptr<float>(),
                                                   directions.data_ptr<float>(), ptr_if<float>(need_x, g_x),
                                                   ptr_if<float>(need_table, g_T), n, n_jacobian, F, &lay, smooth,
                                                   stream));
  return {g_x, g_T};
}

std::vector<torch::Tensor> warp_forward(torch::Tensor image, torch::Tensor points, bool with_gradient) {
  image = image.contiguous();
  points = points.contiguous();
  check(image, "image");
  check(points, "points");
  const int d = (int)points.size(1);
  const int64_t n = points.size(0);
  TORCH_CHECK(image.dim() == d || image.dim() == d + 1,
              "image must be (*spatial) or channel-last (*spatial, C), spatial matching the points");
  const bool channels = image.dim() == d + 1;
  const int64_t C = channels ? image.size(d) : 1;
  int64_t shape[3] = {image.size(0), image.size(1), d == 3 ? image.size(2) : 1};
  auto values = channels ? torch::empty({n, C}, points.options()) : torch::empty({n}, points.options());
  auto grads = !with_gradient ? torch::Tensor()
               : channels     ? torch::empty({n, C, d}, points.options())
                              : torch::empty({n, d}, points.options());
  NR_DEVICE_GUARD(points);
  auto stream = NR_STREAM;
  if (channels && points.scalar_type() == torch::kFloat64)
    check_status(nr_warp_channels_f64(d, image.data_ptr<double>(), shape, C, points.data_ptr<double>(),
                                      values.data_ptr<double>(), ptr_if<double>(with_gradient, grads), n, stream));
  else if (channels)
    check_status(nr_warp_channels_f32(d, image.data_ptr<float>(), shape, C, points.data_ptr<float>(),
                                      values.data_ptr<float>(), ptr_if<float>(with_gradient, grads), n, stream));
  else if (points.scalar_type() == torch::kFloat64)
    check_status(nr_warp_f64(d, image.data_ptr<double>(), shape, points.data_ptr<double>(), values.data_ptr<double>(),
                             ptr_if<double>(with_gradient, grads), n, stream));
  else
    check_status(nr_warp_f32(d, image.data_ptr<float>(), shape, points.data_ptr<float>(), values.data_ptr<float>(),
                             ptr_if<float>(with_gradient, grads), n, stream));
  return {values, grads};
}

std::vector<torch::Tensor> mi_forward(torch::Tensor warped, torch::Tensor fixed, int64_t bins, double eps) {
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  check(warped, "warped");
  check(fixed, "fixed");
  TORCH_CHECK(warped.dim() == 2 && warped.sizes() == fixed.sizes(), "warped and fixed must be (B, N) alike");
  TORCH_CHECK(warped.scalar_type() == fixed.scalar_type(), "warped and fixed must share a dtype");
  TORCH_CHECK(bins >= 4, "at least 4 bins");
  const int64_t B = warped.size(0), n = warped.size(1);
  TORCH_CHECK(n > 0, "empty samples");
  auto value = torch::zeros({B}, warped.options());
  auto log_ratio = torch::empty({B, bins, bins}, warped.options());
  auto scale = torch::empty({B, 4}, warped.options());
  auto joint = torch::zeros({B, bins, bins}, warped.options());
  NR_DEVICE_GUARD(warped);
  auto stream = NR_STREAM;
  if (warped.scalar_type() == torch::kFloat64)
    check_status(nr_mi_forward_f64(warped.data_ptr<double>(), fixed.data_ptr<double>(), value.data_ptr<double>(),
                                   log_ratio.data_ptr<double>(), scale.data_ptr<double>(), joint.data_ptr<double>(), B,
                                   n, (int)bins, eps, stream));
  else
    check_status(nr_mi_forward_f32(warped.data_ptr<float>(), fixed.data_ptr<float>(), value.data_ptr<float>(),
                                   log_ratio.data_ptr<float>(), scale.data_ptr<float>(), joint.data_ptr<float>(), B, n,
                                   (int)bins, (float)eps, stream));
  return {value, log_ratio, scale};
}

torch::Tensor mi_backward(torch::Tensor grad, torch::Tensor warped, torch::Tensor fixed, torch::Tensor scale,
                          torch::Tensor log_ratio, int64_t bins) {
  grad = grad.contiguous();
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  scale = scale.contiguous();
  log_ratio = log_ratio.contiguous();
  for (auto* t : {&grad, &warped, &fixed, &scale, &log_ratio}) check(*t, "mi_backward's inputs");
  TORCH_CHECK(warped.dim() == 2 && warped.sizes() == fixed.sizes(), "warped and fixed must be (B, N) alike");
  const int64_t B = warped.size(0), n = warped.size(1);
  auto g = torch::empty_like(warped);
  NR_DEVICE_GUARD(warped);
  auto stream = NR_STREAM;
  if (warped.scalar_type() == torch::kFloat64)
    check_status(nr_mi_backward_f64(grad.data_ptr<double>(), warped.data_ptr<double>(), fixed.data_ptr<double>(),
                                    scale.data_ptr<double>(), log_ratio.data_ptr<double>(), g.data_ptr<double>(), B, n,
                                    (int)bins, stream));
  else
    check_status(nr_mi_backward_f32(grad.data_ptr<float>(), warped.data_ptr<float>(), fixed.data_ptr<float>(),
                                    scale.data_ptr<float>(), log_ratio.data_ptr<float>(), g.data_ptr<float>(), B, n,
                                    (int)bins, stream));
  return g;
}

std::vector<torch::Tensor> overlap_mi_forward(torch::Tensor warped, torch::Tensor fixed, torch::Tensor weight,
                                              int64_t bins, double eps) {
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  weight = weight.contiguous();
  for (auto* t : {&warped, &fixed, &weight}) check(*t, "overlap_mi_forward's inputs");
  TORCH_CHECK(warped.dim() == 2 && warped.sizes() == fixed.sizes() && warped.sizes() == weight.sizes(),
              "warped, fixed and weight must be (B, N) alike");
  TORCH_CHECK(warped.scalar_type() == fixed.scalar_type() && warped.scalar_type() == weight.scalar_type(),
              "warped, fixed and weight must share a dtype");
  TORCH_CHECK(bins >= 4, "at least 4 bins");
  const int64_t B = warped.size(0), n = warped.size(1);
  TORCH_CHECK(n > 0, "empty samples");
  auto value = torch::empty({B}, warped.options());
  auto entry_grad = torch::empty({B, bins, bins}, warped.options());
  auto scale = torch::empty({B, 4}, warped.options());
  auto joint = torch::zeros({B, bins, bins}, warped.options());
  auto stats = torch::zeros({B, 3}, warped.options());
  NR_DEVICE_GUARD(warped);
  auto stream = NR_STREAM;
  if (warped.scalar_type() == torch::kFloat64)
    check_status(nr_overlap_mi_forward_f64(warped.data_ptr<double>(), fixed.data_ptr<double>(),
                                           weight.data_ptr<double>(), value.data_ptr<double>(),
                                           entry_grad.data_ptr<double>(), scale.data_ptr<double>(),
                                           joint.data_ptr<double>(), stats.data_ptr<double>(), B, n, (int)bins, eps,
                                           stream));
  else
    check_status(nr_overlap_mi_forward_f32(warped.data_ptr<float>(), fixed.data_ptr<float>(), weight.data_ptr<float>(),
                                           value.data_ptr<float>(), entry_grad.data_ptr<float>(),
                                           scale.data_ptr<float>(), joint.data_ptr<float>(), stats.data_ptr<float>(), B,
                                           n, (int)bins, (float)eps, stream));
  return {value, entry_grad, scale};
}

std::vector<torch::Tensor> overlap_mi_backward(torch::Tensor grad, torch::Tensor warped, torch::Tensor fixed,
                                               torch::Tensor weight, torch::Tensor scale, torch::Tensor entry_grad,
                                               int64_t bins) {
  grad = grad.contiguous();
  warped = warped.contiguous();
  fixed = fixed.contiguous();
  weight = weight.contiguous();
  scale = scale.contiguous();
  entry_grad = entry_grad.contiguous();
  for (auto* t : {&grad, &warped, &fixed, &weight, &scale, &entry_grad}) check(*t, "overlap_mi_backward's inputs");
  TORCH_CHECK(warped.dim() == 2 && warped.sizes() == fixed.sizes() && warped.sizes() == weight.sizes(),
              "warped, fixed and weight must be (B, N) alike");
  const int64_t B = warped.size(0), n = warped.size(1);
  auto g_w = torch::empty_like(warped);
  auto g_weight = torch::empty_like(warped);
  NR_DEVICE_GUARD(warped);
  auto stream = NR_STREAM;
  if (warped.scalar_type() == torch::kFloat64)
    check_status(nr_overlap_mi_backward_f64(grad.data_ptr<double>(), warped.data_ptr<double>(),
                                            fixed.data_ptr<double>(), weight.data_ptr<double>(),
                                            scale.data_ptr<double>(), entry_grad.data_ptr<double>(),
                                            g_w.data_ptr<double>(), g_weight.data_ptr<double>(), B, n, (int)bins,
                                            stream));
  else
    check_status(nr_overlap_mi_backward_f32(grad.data_ptr<float>(), warped.data_ptr<float>(), fixed.data_ptr<float>(),
                                            weight.data_ptr<float>(), scale.data_ptr<float>(),
                                            entry_grad.data_ptr<float>(), g_w.data_ptr<float>(),
                                            g_weight.data_ptr<float>(), B, n, (int)bins, stream));
  return {g_w, g_weight};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { NR_OPS(NR_BIND_OP) }
