// The schemas of the native CPU ops, all in one place. The kernels (TORCH_LIBRARY_IMPL for CPU) live in
// reparam_kl.cpp, gan_losses.cpp, linear_act.cpp, fused_layer.cpp, image_head.cpp and adam.cpp, one file per op
// with its math, bytes moved and autograd formula, and plan_step.cpp runs a training step's plan over them; the
// fake (meta) implementations are registered from Python, in vaegan_fast/ops/_native.py. Load with
// torch.ops.load_library(path) after importing torch.
#include "common.h"

#include <string>

#include <torch/library.h>

#ifndef VAEGAN_FAST_ISA
#define VAEGAN_FAST_ISA "unknown"
#endif

namespace vaegan_fast_native {
namespace {
std::string build_isa_op() { return VAEGAN_FAST_ISA; }
}  // namespace
}  // namespace vaegan_fast_native

TORCH_LIBRARY(vaegan_fast_native, m) {
  // Configuration (vaegan_fast/ops/_native_lib.py calls these once at load time; tests switch the path):
  // set_bf16_products(True) forms bf16 products (GEMMs, convolutions) in bf16 with fp32 accumulation
  // (oneDNN), False upcasts their operands to fp32; set_onednn_min_macs(n) sends fp32 products of at least n
  // multiply-adds to oneDNN's matmul (n < 0: none, all on torch's BLAS); both return the previous setting, and
  // products.cpp says what each path does. build_isa: the ISA this copy of the library was compiled for
  // ("generic", "avx2", "avx512").
  m.def("set_bf16_products(bool enabled) -> bool", &vaegan_fast_native::set_bf16_products);
  m.def("set_onednn_min_macs(int min_macs) -> int", &vaegan_fast_native::set_onednn_min_macs);
  m.def("onednn_matmul_problem() -> str", &vaegan_fast_native::onednn_matmul_problem);
  m.def("large_product_macs() -> int", [] { return vaegan_fast_native::kLargeProductMacs; });
  m.def("build_isa() -> str", &vaegan_fast_native::build_isa_op);
  // (z, kl) = reparam_kl(mu, logvar, eps); grads of mu, logvar (and eps when need_grad_eps, else empty).
  m.def("reparam_kl(Tensor mu, Tensor logvar, Tensor eps) -> (Tensor, Tensor)");
  m.def(
      "reparam_kl_backward(Tensor mu, Tensor logvar, Tensor eps, Tensor? grad_z, Tensor? grad_kl, "
      "bool need_grad_eps) -> (Tensor, Tensor, Tensor)");
  // [loss, d loss/d xs[0], ...] with loss = sum_k coeffs[k] * mean softplus(signs[k] * xs[k]); the grads are
  // empty tensors when need_grad is false.
  m.def("softplus_losses(Tensor[] xs, float[] signs, float[] coeffs, bool need_grad) -> Tensor[]");
  // loss = 0.5 * sum (a - b)^2 / N with N = a.size(0), differentiable; its backward:
  // (grad * (a - b) / N, its negation), an entry whose output_mask is false coming back as an empty tensor.
  m.def("feature_recon_loss(Tensor a, Tensor b) -> Tensor");
  m.def("feature_recon_loss_backward(Tensor a, Tensor b, Tensor grad, bool[2] output_mask) -> (Tensor, Tensor)");
  // (loss, (a - b) / N) in one pass: the training step's primitive (not differentiable).
  m.def("feature_recon_terms(Tensor a, Tensor b) -> (Tensor, Tensor)");
  // grad * stored, and its negation when want_negated (else empty): the losses' backward in one pass.
  m.def("scale_grad(Tensor stored, Tensor grad, bool want_negated) -> (Tensor, Tensor)");
  // (y, saved) = act(x @ weight.T + bias); saved is the pre-activation when the derivative cannot be formed
  // from y (gelu, leaky_relu with a slope <= 0), else an empty tensor. activation: index in
  // ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu").
  m.def("linear_act(Tensor x, Tensor weight, Tensor? bias, int activation, float negative_slope) -> "
        "(Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias) from grad_y and saved (y, or the pre-activation); a gradient whose
  // output_mask entry is false comes back as an empty tensor.
  m.def(
      "linear_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor saved, bool saved_is_output, "
      "int activation, float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The fused layer (fused_layer.cpp): kind 0 dense, 1 conv2d, 2 conv_transpose2d; the norm's running
  // statistics and batch count are updated in place in training mode. forward -> [y, x as the product read
  // it (empty: x itself), pre-norm a (empty without a norm), kept (the pre-activation; empty: y), mean, rstd
  // ([groups, C]; empty without a norm)]; backward on the rows of the tensors given -> [dx, dW, db, dgamma, dbeta]
  // (empty when not asked for), dx on dx_rows rows from dx_start; dy_writable lets it compute in dy's memory.
  m.def(
      "fused_layer_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, int kind, int[] stride, "
      "int[] padding, int[] output_padding, bool norm, bool training, float momentum, float eps, int groups, "
      "int activation, float negative_slope) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused_layer_backward(Tensor dy, Tensor x, Tensor weight, bool has_bias, Tensor? pre, Tensor kept, "
      "Tensor? mean, Tensor? rstd, Tensor? norm_weight, int kind, int[] stride, int[] padding, "
      "int[] output_padding, bool norm, bool training, int groups, int activation, float negative_slope, "
      "bool entry_pre_norm, bool need_dx, bool need_dw, int dx_start, int dx_rows, bool dy_writable) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The training step's image head (image_head.cpp): images = sigmoid(logits) written into `images` (B or 2B
  // rows), and the pixel BCE term of the last B rows (0 unless with_pixel); backward: (dec_up, enc_up), the
  // gradients at the decoder's logits [prior; rec] and at its reconstruction rows for the encoder.
  m.def("image_head_forward(Tensor logits, Tensor x, Tensor(a!) images, bool with_pixel) -> Tensor");
  m.def(
      "image_head_backward(Tensor images, Tensor x, Tensor g, Tensor u, float gamma, float pixel_factor, "
      "bool g_has_rec, bool u_has_prior) -> (Tensor, Tensor)");
  // Adam's update of fp32 parameters from bf16 gradients in place (adam.cpp: torch's fused Adam on the widened
  // gradients); steps already incremented; found_inf == 1 skips it all.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] steps, float lr, float beta1, float beta2, float weight_decay, float eps, Tensor? found_inf) -> ()");
  // A training step's whole plan in one call (plan_step.cpp; vaegan_fast/step/execute.py is its specification):
  // [each trained network's gradients in its parameter order (in the parameters' dtype when master_grads, else in
  // the step's), then the output slots].
  m.def(
      "plan_step(Tensor?[] inputs, int[] program, float[] program_floats, Tensor?[] layer_tensors, "
      "int[] layer_table, float[] layer_floats, int[] networks, int[] outputs, int n_slots, bool master_grads) -> "
      "Tensor[]");
}
