// The native ops' CPU functions, declared for use across files: routed_step.cpp runs the whole training step
// by calling them directly (no dispatcher, no Python between them). Each is defined, with its math and the
// bytes it moves, in the file named beside it; the schemas are in library.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

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
std::vector<at::Tensor> dense_chain_forward(const at::Tensor& x, at::TensorList weights,
                                            const c10::List<std::optional<at::Tensor>>& biases,
                                            at::IntArrayRef activations, at::ArrayRef<double> slopes);
std::vector<at::Tensor> dense_chain_backward(const at::Tensor& dy, at::TensorList inputs, at::TensorList weights,
                                             at::TensorList saved, at::IntArrayRef has_bias,
                                             at::IntArrayRef activations, at::ArrayRef<double> slopes,
                                             int64_t row_start, int64_t row_end, bool weight_grads,
                                             bool input_grad);

// image_head.cpp
at::Tensor image_head_forward(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& images,
                              bool with_pixel);
std::tuple<at::Tensor, at::Tensor> image_head_backward(const at::Tensor& images, const at::Tensor& x,
                                                       const at::Tensor& g_fake, const at::Tensor& u_rec,
                                                       double gamma, double pixel_factor, bool recon_as_fake);

}  // namespace vaegan_fast_native
