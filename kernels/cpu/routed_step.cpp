// The routed VAE-GAN training step on the CPU, whole, in one op call: vaegan_fast/step.py's streams (its
// specification, which the Python loop over the same native primitives follows step for step) run here in
// C++, calling the native kernels directly. It moves no byte and forms no product that step.py does not; what
// it removes is the framework's cost between them: on the "seed" preset the Python step makes about 80 op calls,
// each crossing Python, argument parsing and the dispatcher, and runs its glue in the interpreter while the
// second core waits (same-process A/B on a 2-core CPU: 14.2 ms per train_step with this op, 16.6 ms without).
//
//   forward    encoder on x (B rows) -> [mu | logvar_raw], logvar = clamp(logvar_raw), (z, kl) = reparam_kl
//              decoder on [z_p; z] (2B rows) -> logits; images = sigmoid(logits) written into the
//              discriminator's input rows [x; x_p; x_rec] (3B) with the pixel BCE term (image_head_forward)
//              discriminator on the 3B rows -> scores, features at the feature layer
//   losses     llike (feature_recon_terms), L_D and L_G (softplus_losses), with their input gradients;
//              d_real, d_fake (the gate's statistics), the KL mean, the pixel term
//   backward   D (weight gradients), G and U (input gradients) through the discriminator; image_head_backward;
//              Dd (weight gradients) and E (input gradients) through the decoder; the reparameterization's and
//              the clamp's gradients; the encoder's weight gradients
//
// Returns [encoder grads..., decoder grads..., discriminator grads..., losses...]: each network's gradients in
// its parameter order (weight, then bias where the layer has one), then the 0-dim losses encoder, decoder,
// discriminator, kl, llike, generator, d_real, d_fake, and pixel when pixel_weight > 0. Everything computes in
// x's dtype (float32, bfloat16 or float64); weights of another dtype (fp32 masters of a bf16 step) are cast.
#include "common.h"
#include "ops.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/full_like.h>

namespace vaegan_fast_native {
namespace {

// One network's layers as the op receives them, cast to the compute dtype, and its forward cache.
struct Network {
  std::vector<at::Tensor> weights;
  c10::List<std::optional<at::Tensor>> biases;
  std::vector<int64_t> activations, has_bias;
  std::vector<double> slopes;
  std::vector<at::Tensor> inputs, saved;  // per layer: its input, and what its backward needs

  Network(const char* name, at::TensorList w, const c10::List<std::optional<at::Tensor>>& b, at::IntArrayRef act,
          at::ArrayRef<double> slope, at::ScalarType dtype)
      : activations(act.begin(), act.end()), slopes(slope.begin(), slope.end()) {
    TORCH_CHECK(!w.empty() && b.size() == w.size() && act.size() == w.size() && slope.size() == w.size(),
                "vaegan_fast native routed_step: the ", name, "'s weights, biases, activations and slopes must "
                "have one entry per layer");
    for (size_t i = 0; i < w.size(); ++i) {
      weights.push_back(w[i].scalar_type() == dtype ? w[i] : w[i].to(dtype));
      std::optional<at::Tensor> bias = b.get(i);
      const bool with_bias = bias.has_value() && bias->defined();
      has_bias.push_back(with_bias);
      biases.push_back(with_bias && bias->scalar_type() != dtype ? std::optional<at::Tensor>(bias->to(dtype))
                                                                 : bias);
    }
  }

  // The forward through every layer; keeps each layer's input and saved tensor for the backward streams.
  at::Tensor forward(const at::Tensor& x) {
    auto out = dense_chain_forward(x, weights, biases, activations, slopes);
    at::Tensor h = x;
    for (size_t i = 0; i < weights.size(); ++i) {
      inputs.push_back(h);
      const at::Tensor& kept = out[2 * i + 1];
      h = out[2 * i];
      saved.push_back(kept.numel() > 0 ? kept : h);  // kept is empty unless the pre-activation is needed
    }
    return h;
  }

  // One backward stream from layer `top` down to 0 on rows [r0, r1): (input gradient or undefined, layer grads).
  std::vector<at::Tensor> backward(const at::Tensor& dy, size_t top, int64_t r0, int64_t r1, bool weight_grads,
                                   bool input_grad) const {
    const size_t n = top + 1;
    return dense_chain_backward(dy, at::TensorList(inputs).slice(0, n), at::TensorList(weights).slice(0, n),
                                at::TensorList(saved).slice(0, n), at::IntArrayRef(has_bias).slice(0, n),
                                at::IntArrayRef(activations).slice(0, n), at::ArrayRef<double>(slopes).slice(0, n),
                                r0, r1, weight_grads, input_grad);
  }

  // A chain's [dx, dW_0, db_0, ...] as the parameter-order list [dW_0, db_0 (if bias), dW_1, ...].
  void append_param_grads(const std::vector<at::Tensor>& chain, std::vector<at::Tensor>& out) const {
    for (size_t i = 0; i < weights.size(); ++i) {
      out.push_back(chain[1 + 2 * i]);
      if (has_bias[i]) out.push_back(chain[2 + 2 * i]);
    }
  }
};

// softplus(t) = clamp_min(t, 0) + log1p(exp(-|t|)), with the ATen ops vaegan_fast/ops/gan_losses.py uses, so the
// gate's statistics are bitwise those of the Python step.
at::Tensor softplus_of(const at::Tensor& t) { return t.clamp_min(0) + t.abs().neg().exp().log1p(); }

}  // namespace

std::vector<at::Tensor> routed_step(
    const at::Tensor& x, const at::Tensor& eps_, const at::Tensor& z_prior,
    at::TensorList enc_w, const c10::List<std::optional<at::Tensor>>& enc_b, at::IntArrayRef enc_act,
    at::ArrayRef<double> enc_slope, at::TensorList dec_w, const c10::List<std::optional<at::Tensor>>& dec_b,
    at::IntArrayRef dec_act, at::ArrayRef<double> dec_slope, at::TensorList dis_w,
    const c10::List<std::optional<at::Tensor>>& dis_b, at::IntArrayRef dis_act, at::ArrayRef<double> dis_slope,
    int64_t latent, int64_t feature_layer, double gamma, double pixel_weight, bool recon_as_fake, bool saturating,
    double logvar_min, double logvar_max) {
  check_dtype(x, "routed_step", "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0, "vaegan_fast native routed_step: x must be [B, P], got ", x.sizes());
  const auto dtype = x.scalar_type();
  const int64_t B = x.size(0);
  TORCH_CHECK(eps_.dim() == 2 && eps_.size(0) == B && eps_.size(1) == latent && z_prior.sizes() == eps_.sizes(),
              "vaegan_fast native routed_step: eps and z_prior must be [", B, ", ", latent, "], got ", eps_.sizes(),
              " and ", z_prior.sizes());
  TORCH_CHECK(z_prior.scalar_type() == dtype, "vaegan_fast native routed_step: z_prior must have x's dtype ", dtype);
  Network enc("encoder", enc_w, enc_b, enc_act, enc_slope, dtype);
  Network dec("decoder", dec_w, dec_b, dec_act, dec_slope, dtype);
  Network dis("discriminator", dis_w, dis_b, dis_act, dis_slope, dtype);
  TORCH_CHECK(0 <= feature_layer && feature_layer + 1 < static_cast<int64_t>(dis.weights.size()),
              "vaegan_fast native routed_step: feature_layer ", feature_layer, " is not a hidden layer");
  const at::Tensor eps = eps_.scalar_type() == dtype ? eps_ : eps_.to(dtype);

  // ---- forward
  const at::Tensor stats = enc.forward(x);
  TORCH_CHECK(stats.size(1) == 2 * latent, "vaegan_fast native routed_step: the encoder's head gives ",
              stats.size(1), " values per row, expected 2 * latent = ", 2 * latent);
  const at::Tensor mu = stats.narrow(1, 0, latent), logvar_raw = stats.narrow(1, latent, latent);
  const at::Tensor logvar = logvar_raw.clamp(logvar_min, logvar_max);
  auto [z, kl] = reparam_kl(mu, logvar, eps);
  // Rows [prior; reconstruction] in the decoder, [real; prior; reconstruction] in the discriminator: every
  // stream below works on one contiguous block of rows.
  const at::Tensor logits = dec.forward(at::cat({z_prior, z}));
  const int64_t P = logits.size(1);
  TORCH_CHECK(P == x.size(1), "vaegan_fast native routed_step: the decoder gives ", P, " pixels, x has ",
              x.size(1));
  at::Tensor dis_input = at::empty({3 * B, P}, x.options());
  dis_input.narrow(0, 0, B).copy_(x);
  const at::Tensor images = dis_input.narrow(0, B, 2 * B);
  const bool with_pixel = pixel_weight > 0;
  const at::Tensor pixel = image_head_forward(logits, x, images, with_pixel).to(dtype);
  const at::Tensor scores = dis.forward(dis_input).reshape({3 * B});
  const at::Tensor s_real = scores.narrow(0, 0, B), s_prior = scores.narrow(0, B, B);
  const at::Tensor s_rec = scores.narrow(0, 2 * B, B);
  const at::Tensor& features = dis.inputs[feature_layer + 1];
  const at::Tensor f_real = features.narrow(0, 0, B), f_rec = features.narrow(0, 2 * B, B);

  // ---- losses, each with its input gradients from the same pass
  auto [llike, grad_real] = feature_recon(f_real, f_rec, true);
  const at::Tensor d_llike = grad_real.neg_();  // d llike / d f_rec
  const int64_t fakes_end = recon_as_fake ? 3 * B : 2 * B;
  std::vector<at::Tensor> fakes = {s_prior};
  if (recon_as_fake) fakes.push_back(s_rec);
  const std::vector<double> ones(fakes.size(), 1.0), minus_ones(fakes.size(), -1.0);
  std::vector<at::Tensor> d_inputs = {s_real};
  d_inputs.insert(d_inputs.end(), fakes.begin(), fakes.end());
  std::vector<double> d_signs = {-1.0}, d_coeffs = {1.0};
  d_signs.insert(d_signs.end(), ones.begin(), ones.end());
  d_coeffs.insert(d_coeffs.end(), ones.begin(), ones.end());
  auto d_terms = softplus_losses(d_inputs, d_signs, d_coeffs, true);
  const at::Tensor disc_loss = d_terms[0];
  const at::Tensor grad_scores_d = at::cat(at::TensorList(d_terms).slice(1));
  auto g_terms = saturating ? softplus_losses(fakes, ones, minus_ones, true)
                            : softplus_losses(fakes, minus_ones, ones, true);
  const at::Tensor gen_loss = g_terms[0];
  const at::Tensor grad_scores_g = g_terms.size() > 2 ? at::cat(at::TensorList(g_terms).slice(1)) : g_terms[1];
  const at::Tensor d_real = softplus_of(s_real.neg()).mean();
  const at::Tensor d_fake = softplus_of(s_prior).mean();
  const at::Tensor prior = kl.mean();
  at::Tensor enc_loss = prior + llike;
  at::Tensor dec_loss = llike.mul(gamma) + gen_loss;
  if (with_pixel) {
    enc_loss = enc_loss + pixel.mul(pixel_weight);
    dec_loss = dec_loss + pixel.mul(pixel_weight);
  }

  // ---- the discriminator's streams: D (weight gradients), G and U (input gradients at its input)
  const size_t dis_top = dis.weights.size() - 1;
  std::vector<at::Tensor> out;
  std::vector<at::Tensor> dis_grads;
  dis.append_param_grads(dis.backward(grad_scores_d.unsqueeze(1), dis_top, 0, fakes_end, true, false), dis_grads);
  const at::Tensor g_input = dis.backward(grad_scores_g.unsqueeze(1), dis_top, B, fakes_end, false, true)[0];
  const at::Tensor u_input = dis.backward(d_llike, feature_layer, 2 * B, 3 * B, false, true)[0];

  // ---- through the sigmoid into the decoder's logits, with the pixel term's gradient
  auto [dec_up, enc_up] = image_head_backward(images, x, g_input.contiguous(), u_input.contiguous(), gamma,
                                              pixel_weight / double(B), recon_as_fake);

  // ---- the decoder's streams: Dd (weight gradients, 2B rows), E (input gradients, the B rows of z)
  const size_t dec_top = dec.weights.size() - 1;
  std::vector<at::Tensor> dec_grads;
  dec.append_param_grads(dec.backward(dec_up, dec_top, 0, 2 * B, true, false), dec_grads);
  const at::Tensor dz = dec.backward(enc_up, dec_top, B, 2 * B, false, true)[0];

  // ---- the encoder: reparameterization, KL and the clamp, then its layers
  const at::Tensor grad_kl = at::full_like(kl, 1.0 / double(B));
  auto [d_mu, d_logvar_clamped, unused] = reparam_kl_backward(mu, logvar, eps, dz, grad_kl, false);
  const at::Tensor d_logvar = d_logvar_clamped * (logvar_raw.ge(logvar_min) & logvar_raw.le(logvar_max));
  std::vector<at::Tensor> enc_grads;
  enc.append_param_grads(
      enc.backward(at::cat({d_mu, d_logvar}, 1), enc.weights.size() - 1, 0, B, true, false), enc_grads);

  out.reserve(enc_grads.size() + dec_grads.size() + dis_grads.size() + 9);
  out.insert(out.end(), enc_grads.begin(), enc_grads.end());
  out.insert(out.end(), dec_grads.begin(), dec_grads.end());
  out.insert(out.end(), dis_grads.begin(), dis_grads.end());
  for (const at::Tensor& loss : {enc_loss, dec_loss, disc_loss, prior, llike, gen_loss, d_real, d_fake})
    out.push_back(loss);
  if (with_pixel) out.push_back(pixel);
  return out;
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) { m.impl("routed_step", &routed_step); }

}  // namespace vaegan_fast_native
