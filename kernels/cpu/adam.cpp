// Adam's update of fp32 parameters from bf16 gradients (vaegan_fast/optim.py calls it for a bf16 step's
// gradients, which the training step hands over as the bf16 products made them): torch's fused Adam on the CPU
// (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, plain Adam, no amsgrad or maximize) with each gradient widened
// to fp32 as it is read. Its specification is torch._fused_adam_ on the widened gradients (tests/test_adam.py):
// the same operations in the same order, so the vectorised body gives torch's bits, and a parameter's last
// size % vector-width elements (scalar code, whose multiply-adds torch's compiler contracts as it chose) are
// within an ulp of them. Per element
//   g = grad (+ weight_decay * p)
//   m = lerp(m, g, 1 - beta1)                      (torch's vectorised lerp: fmadd on the nearer end)
//   v = v * beta2 + (1 - beta2) * g * g
//   p = p - step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps),   step_size = lr / bias_correction1
// with the bias corrections 1 - beta^step in double from each parameter's step (a float tensor that the caller
// has already incremented). found_inf (a 0-dim float tensor) equal to 1 skips every update.
//
// Bytes moved per element: grad 2 (bf16), p, m, v read and written 4 each: 26, against the 6 of a separate
// bf16 -> fp32 cast plus the 28 of torch's update on its output.
#include "common.h"

#include <ATen/native/Lerp.h>

#include <cmath>

namespace vaegan_fast_native {
namespace {

using Vec = at::vec::Vectorized<float>;

struct Coefficients {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, bias_correction2_sqrt, step_size, eps, weight_decay;
};

// Adam on n contiguous elements whose gradients (already fp32) are in g; n is a multiple of Vec::size() except
// at a parameter's end, whose remainder runs the scalar loop (as torch's kernel does).
inline void adam_block(float* p, const float* g, float* m, float* v, int64_t n, const Coefficients& c) {
  const Vec beta2(c.beta2), one_minus_beta2(c.one_minus_beta2), bc2(c.bias_correction2_sqrt),
      step_size(c.step_size), eps(c.eps), wd(c.weight_decay), lerp_weight(c.one_minus_beta1);
  const auto nearer = lerp_weight.abs() < Vec(0.5f);
  const Vec coeff = Vec::blendv(lerp_weight - Vec(1.0f), lerp_weight, nearer);
  int64_t d = 0;
  for (; d < n - (n % Vec::size()); d += Vec::size()) {
    Vec pv = Vec::loadu(p + d), gv = Vec::loadu(g + d);
    if (c.weight_decay != 0.f) gv += pv * wd;
    Vec mv = Vec::loadu(m + d);
    const Vec base = Vec::blendv(gv, mv, nearer);
    mv = at::vec::fmadd(coeff, gv - mv, base);
    const Vec vv = Vec::loadu(v + d) * beta2 + one_minus_beta2 * gv * gv;
    mv.store(m + d);
    vv.store(v + d);
    const Vec denom = (vv.sqrt() / bc2) + eps;
    pv = pv - step_size * mv / denom;
    pv.store(p + d);
  }
  for (; d < n; ++d) {
    float gd = g[d];
    if (c.weight_decay != 0.f) gd += p[d] * c.weight_decay;
    m[d] = at::native::lerp(m[d], gd, c.one_minus_beta1);
    v[d] = std::fma(v[d], c.beta2, c.one_minus_beta2 * gd * gd);  // torch's build mostly contracts it so
    const float denom = std::sqrt(v[d]) / c.bias_correction2_sqrt + c.eps;
    p[d] = p[d] - c.step_size * m[d] / denom;
  }
}

void check_list(const std::vector<at::Tensor>& ts, const std::vector<at::Tensor>& params, const char* name,
                at::ScalarType dtype) {
  TORCH_CHECK(ts.size() == params.size(), "vaegan_fast native adam_step_: ", name, " has ", ts.size(),
              " tensors for ", params.size(), " parameters");
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].device().is_cpu() && ts[i].scalar_type() == dtype && ts[i].is_contiguous() &&
                    ts[i].sizes() == params[i].sizes(),
                "vaegan_fast native adam_step_: ", name, "[", i, "] must be a contiguous CPU ", dtype,
                " tensor of shape ", params[i].sizes(), ", got ", ts[i].scalar_type(), " ", ts[i].sizes(),
                ts[i].is_contiguous() ? "" : " (not contiguous)");
  }
}

}  // namespace

void adam_step_(at::TensorList params_, at::TensorList grads_, at::TensorList exp_avgs_,
                at::TensorList exp_avg_sqs_, at::TensorList steps, double lr, double beta1, double beta2,
                double weight_decay, double eps, const std::optional<at::Tensor>& found_inf) {
  const std::vector<at::Tensor> params = params_.vec(), exp_avgs = exp_avgs_.vec(), exp_avg_sqs = exp_avg_sqs_.vec();
  std::vector<at::Tensor> grads;  // read only: any layout, made contiguous (a no-op for the step's gradients)
  for (const auto& g : grads_) grads.push_back(g.contiguous());
  check_list(params, params, "params", at::kFloat);
  check_list(grads, params, "grads", at::kBFloat16);
  check_list(exp_avgs, params, "exp_avgs", at::kFloat);
  check_list(exp_avg_sqs, params, "exp_avg_sqs", at::kFloat);
  TORCH_CHECK(steps.size() == params.size(), "vaegan_fast native adam_step_: steps has ", steps.size(),
              " tensors for ", params.size(), " parameters");
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat,
                "vaegan_fast native adam_step_: found_inf must be a one-element float tensor");
    if (found_inf->item<float>() == 1.0f) return;
  }
  // Tasks of kTask elements (a multiple of every Vec::size()) within each parameter; blocks of kBlock inside.
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (parameter, first element)
  std::vector<Coefficients> coeffs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1, "vaegan_fast native adam_step_: steps[", i, "] must hold one value");
    const double step = steps[i].item<double>();
    const double bc1 = 1 - std::pow(beta1, step), bc2 = 1 - std::pow(beta2, step);
    coeffs[i] = {float(beta1), float(beta2), float(1 - beta1), float(1 - beta2), float(std::sqrt(bc2)),
                 float(lr / bc1), float(eps), float(weight_decay)};
    for (int64_t e = 0; e < params[i].numel(); e += kTask) tasks.emplace_back(i, e);
  }
  for_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const auto [i, e0] = tasks[t];
    const int64_t numel = params[i].numel(), e1 = std::min(numel, e0 + kTask);
    float* p = params[i].data_ptr<float>();
    float* m = exp_avgs[i].data_ptr<float>();
    float* v = exp_avg_sqs[i].data_ptr<float>();
    const c10::BFloat16* g = grads[i].const_data_ptr<c10::BFloat16>();
    float buf[kBlock];
    for (int64_t b = e0; b < e1; b += kBlock) {
      const int64_t n = std::min(kBlock, e1 - b);
      adam_block(p + b, load(g + b, buf, n), m + b, v + b, n, coeffs[i]);
    }
  });
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) { m.impl("adam_step_", &adam_step_); }

}  // namespace vaegan_fast_native
