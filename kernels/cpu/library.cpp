// The schemas of the native CPU ops, all in one place. The kernels (TORCH_LIBRARY_IMPL for CPU) live in
// reparam_kl.cpp, gan_losses.cpp, linear_act.cpp and image_head.cpp, one file per op with its math, bytes
// moved and autograd formula, and routed_step.cpp runs the training step over them; the fake (meta)
// implementations are registered from Python, in vaegan_fast/ops/_native.py. Load with
// torch.ops.load_library(path) after importing torch.
#include <torch/library.h>

TORCH_LIBRARY(vaegan_fast_native, m) {
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
  // The routed step's streams of layers, one call each (linear_act.cpp): the forward returns
  // [y_0, kept_0, y_1, kept_1, ...]; the backward [dx, dW_0, db_0, ...], from the top layer down, on rows
  // [row_start, row_end) of the cached inputs and saved tensors.
  m.def(
      "dense_chain_forward(Tensor x, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "float[] negative_slopes) -> Tensor[]");
  m.def(
      "dense_chain_backward(Tensor grad_y, Tensor[] inputs, Tensor[] weights, Tensor[] saved, int[] has_bias, "
      "int[] activations, float[] negative_slopes, int row_start, int row_end, bool weight_grads, "
      "bool input_grad) -> Tensor[]");
  // The routed step's image head (image_head.cpp): images = sigmoid(logits) written into `images`, and the
  // pixel BCE term of the reconstruction rows (0 unless with_pixel); backward: (dec_up, enc_up), the
  // gradients at the decoder's logits and at its reconstruction rows for the encoder.
  m.def("image_head_forward(Tensor logits, Tensor x, Tensor(a!) images, bool with_pixel) -> Tensor");
  m.def(
      "image_head_backward(Tensor images, Tensor x, Tensor g_fake, Tensor u_rec, float gamma, "
      "float pixel_factor, bool recon_as_fake) -> (Tensor, Tensor)");
  // The whole routed training step in one call (routed_step.cpp; vaegan_fast/step.py is its specification):
  // [encoder grads, decoder grads, discriminator grads (each network's parameter order), losses encoder,
  // decoder, discriminator, kl, llike, generator, d_real, d_fake (, pixel when pixel_weight > 0)].
  m.def(
      "routed_step(Tensor x, Tensor eps, Tensor z_prior, "
      "Tensor[] enc_weights, Tensor?[] enc_biases, int[] enc_activations, float[] enc_slopes, "
      "Tensor[] dec_weights, Tensor?[] dec_biases, int[] dec_activations, float[] dec_slopes, "
      "Tensor[] dis_weights, Tensor?[] dis_biases, int[] dis_activations, float[] dis_slopes, "
      "int latent, int feature_layer, float gamma, float pixel_weight, bool recon_as_fake, bool saturating, "
      "float logvar_min, float logvar_max) -> Tensor[]");
}
