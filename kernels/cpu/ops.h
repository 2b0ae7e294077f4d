// The native ops' CPU functions, declared for use across files: plan_step.cpp runs a whole training step's plan
// by calling them directly (no dispatcher, no Python between them). Each is defined, with its math and the
// bytes it moves, in the file named beside it; the schemas are in library.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace vaegan_fast_native {

// reparam_kl.cpp
std::tuple<at::Tensor, at::Tensor> reparam_kl(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_kl_backward(
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps, const std::optional<at::Tensor>& grad_z,
    const std::optional<at::Tensor>& grad_kl, bool need_grad_eps);

// gan_losses.cpp
std::vector<at::Tensor> softplus_losses(at::TensorList xs, at::ArrayRef<double> signs, at::ArrayRef<double> coeffs,
                                        bool need_grad);
// (loss, (a - b) / N); the gradient is an undefined tensor unless need_grad
std::tuple<at::Tensor, at::Tensor> feature_recon(const at::Tensor& a, const at::Tensor& b, bool need_grad);

// linear_act.cpp
std::tuple<at::Tensor, at::Tensor> linear_act(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, int64_t act, double slope);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& saved,
    bool saved_is_output, int64_t act, double slope, std::array<bool, 3> mask);

using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensors6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// fused_layer.cpp: {y, x as the product read it, pre-norm a, kept (y or pre-activation), mean, rstd} and
// {dx, dW, db, dgamma, dbeta}, as the registered ops fused_layer_forward / fused_layer_backward give them, plus
// for the training step (plan_step.cpp) a column-path conv2d's window rows of x, gathered once in forward
// (*windows, when not null) and read back by its weight gradient (undefined: gathered again). Same results.
Tensors6 fused_layer_forward_keeping_windows(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t kind, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, bool norm, bool training, double momentum, double eps,
    int64_t groups, int64_t act, double slope, at::Tensor* windows);
Tensors5 fused_layer_backward_with_windows(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pre, const at::Tensor& kept, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& rstd, const std::optional<at::Tensor>& norm_weight, int64_t kind,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, bool norm, bool training,
    int64_t groups, int64_t act, double slope, bool entry_pre_norm, bool need_dx, bool need_dw, int64_t dx_start,
    int64_t dx_rows, bool dy_writable, const at::Tensor& windows);

// image_head.cpp
at::Tensor image_head_forward(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& images,
                              bool with_pixel);
std::tuple<at::Tensor, at::Tensor> image_head_backward(const at::Tensor& images, const at::Tensor& x,
                                                       const at::Tensor& g, const at::Tensor& u, double gamma,
                                                       double pixel_factor, bool g_has_rec, bool u_has_prior);

}  // namespace vaegan_fast_native
