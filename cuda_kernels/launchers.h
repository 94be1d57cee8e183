// The C launchers of the CUDA kernels: defined in hashgrid.cu and warp.cu, called by the
// torch binding native_cuda.cpp. Both sides include this one header, so a signature that
// changes on one side only is a compile error (C functions cannot be overloaded), not a
// silent mismatch at link or run time.
//
// Output buffers of the backward passes (gx, gT, g_x, g_T, g_gy) must be zeroed. Every
// launcher returns 0 or the CUDA error of its launch (-1: unsupported dimension).
#pragma once

#include <stdint.h>

#include "cuda_compat.h"
#include "layout.h"

extern "C" {
int nr_hashgrid_forward_f32(int d, const float* x, const float* table, float* y, int64_t n, int F,
                            const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_forward_f64(int d, const double* x, const double* table, double* y, int64_t n, int F,
                            const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_backward_f32(int d, const float* gy, const float* x, const float* table, float* gx, float* gT,
                             int64_t n, int F, const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_backward_f64(int d, const double* gy, const double* x, const double* table, double* gx, double* gT,
                             int64_t n, int F, const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_double_backward_f32(int d, const float* ggx, const float* ggT, const float* gy, const float* x,
                                    const float* table, float* g_gy, float* g_x, float* g_T, int64_t n, int F,
                                    const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_double_backward_f64(int d, const double* ggx, const double* ggT, const double* gy, const double* x,
                                    const double* table, double* g_gy, double* g_x, double* g_T, int64_t n, int F,
                                    const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_forward_jacobian_f32(int d, const float* x, const float* table, const float* directions, float* y,
                                     float* dirs, int64_t n, int64_t n_jac, int F, const nr::LevelLayout* lay,
                                     bool smooth, cudaStream_t s);
int nr_hashgrid_forward_jacobian_f64(int d, const double* x, const double* table, const double* directions, double* y,
                                     double* dirs, int64_t n, int64_t n_jac, int F, const nr::LevelLayout* lay,
                                     bool smooth, cudaStream_t s);
int nr_hashgrid_jacobian_backward_f32(int d, const float* gy, const float* gdirs, const float* x, const float* table,
                                      const float* directions, float* g_x, float* g_T, int64_t n, int64_t n_jac, int F,
                                      const nr::LevelLayout* lay, bool smooth, cudaStream_t s);
int nr_hashgrid_jacobian_backward_f64(int d, const double* gy, const double* gdirs, const double* x,
                                      const double* table, const double* directions, double* g_x, double* g_T,
                                      int64_t n, int64_t n_jac, int F, const nr::LevelLayout* lay, bool smooth,
                                      cudaStream_t s);
int nr_warp_f32(int d, const float* image, const int64_t* shape, const float* points, float* values, float* grads,
                int64_t n, cudaStream_t s);
int nr_warp_f64(int d, const double* image, const int64_t* shape, const double* points, double* values,
                double* grads, int64_t n, cudaStream_t s);
int nr_warp_channels_f32(int d, const float* image, const int64_t* shape, int64_t channels, const float* points,
                         float* values, float* grads, int64_t n, cudaStream_t s);
int nr_warp_channels_f64(int d, const double* image, const int64_t* shape, int64_t channels, const double* points,
                         double* values, double* grads, int64_t n, cudaStream_t s);
int nr_mi_forward_f32(const float* w, const float* f, float* value, float* log_ratio, float* scale, float* joint,
                      int64_t B, int64_t n, int bins, float eps, cudaStream_t s);
int nr_mi_forward_f64(const double* w, const double* f, double* value, double* log_ratio, double* scale,
                      double* joint, int64_t B, int64_t n, int bins, double eps, cudaStream_t s);
int nr_mi_backward_f32(const float* grad, const float* w, const float* f, const float* scale, const float* log_ratio,
                       float* g, int64_t B, int64_t n, int bins, cudaStream_t s);
int nr_mi_backward_f64(const double* grad, const double* w, const double* f, const double* scale,
                       const double* log_ratio, double* g, int64_t B, int64_t n, int bins, cudaStream_t s);
int nr_overlap_mi_forward_f32(const float* w, const float* f, const float* weight, float* value, float* entry_grad,
                              float* scale, float* joint, float* stats, int64_t B, int64_t n, int bins, float eps,
                              cudaStream_t s);
int nr_overlap_mi_forward_f64(const double* w, const double* f, const double* weight, double* value,
                              double* entry_grad, double* scale, double* joint, double* stats, int64_t B, int64_t n,
                              int bins, double eps, cudaStream_t s);
int nr_overlap_mi_backward_f32(const float* grad, const float* w, const float* f, const float* weight,
                               const float* scale, const float* entry_grad, float* g_w, float* g_weight, int64_t B,
                               int64_t n, int bins, cudaStream_t s);
int nr_overlap_mi_backward_f64(const double* grad, const double* w, const double* f, const double* weight,
                               const double* scale, const double* entry_grad, double* g_w, double* g_weight,
                               int64_t B, int64_t n, int bins, cudaStream_t s);
}
