// reparam_kl on the CPU: reparameterisation and the KL to N(0, I), one pass each way.
//
//   forward   s = exp(logvar / 2)
//             z[b, j] = mu[b, j] + s[b, j] * eps[b, j]
//             kl[b]   = 0.5 * sum_j (mu^2 + s^2 - logvar - 1)          (s^2 = exp(logvar): one exp)
//   backward  d mu     = dz + dkl[b] * mu
//             d logvar = 0.5 * dz * s * eps + 0.5 * dkl[b] * (s^2 - 1)
//             d eps    = dz * s                                          (only when eps needs a gradient)
//   dz or dkl may be absent (undefined tensor): that term is zero.
//
// Bytes moved, B x D elements of size e: forward reads mu, logvar, eps and writes z (4 BDe) plus kl (Be);
// backward reads mu, logvar, eps, dz (4 BDe) and dkl (Be) and writes d mu, d logvar (2 BDe), + BDe for
// d eps. Eager PyTorch makes ~10 passes forward and ~15 backward (one per elementwise op).
//
// Parallel over whole rows (about kTask elements per task), so each kl[b] is summed by one thread in a
// fixed order: the result does not depend on the thread count.
#include "common.h"

#include <ATen/ops/exp.h>
#include <ATen/ops/zeros_like.h>

namespace vaegan_fast_native {
namespace {

template <typename T>
void reparam_forward_kernel(const T* mu, const T* lv, const T* eps, T* z, T* kl, int64_t B, int64_t D) {
  using C = Chunk<T>;
  using V = typename C::V;
  using A = acc_t<T>;
  const int64_t rows_per_task = std::max<int64_t>(1, kTask / D);
  for_tasks(ceil_div(B, rows_per_task), [&](int64_t task) {
    // Locals, not captures: see for_tasks.
    const int64_t cols = D, r1 = std::min(B, (task + 1) * rows_per_task);
    T* const zo = z;
    T* const ko = kl;
    const V half(A(0.5)), one(A(1));
    for (int64_t r = task * rows_per_task; r < r1; ++r) {
      V acc[C::kVecs];
      for (auto& v : acc) v = V(0);
      // Past the row's end a partial chunk reads mu = logvar = 0: s = 1 and a KL term of exactly 0.
      for_chunks<T>(r * cols, (r + 1) * cols, [&](int64_t i, int64_t m) {
        C cm, cl, ce;
        cm.load(mu + i, m);
        cl.load(lv + i, m);
        ce.load(eps + i, m);
        for (int k = 0; k < C::kVecs; ++k) {
          const V s = (half * cl.v[k]).exp();
          acc[k] = acc[k] + (cm.v[k] * cm.v[k] + s * s - cl.v[k] - one);
          cm.v[k] = cm.v[k] + s * ce.v[k];
        }
        cm.store(zo + i, m);
      });
      ko[r] = static_cast<T>(A(0.5) * static_cast<A>(ordered_lanes(acc)));
    }
  });
}

template <typename T>
void reparam_backward_kernel(const T* mu, const T* lv, const T* eps, const T* dz, const T* dkl, T* dmu,
                             T* dlv, T* deps, int64_t B, int64_t D) {
  using C = Chunk<T>;
  using V = typename C::V;
  using A = acc_t<T>;
  const int64_t rows_per_task = std::max<int64_t>(1, kTask / D);
  for_tasks(ceil_div(B, rows_per_task), [&](int64_t task) {
    // Locals, not captures: see for_tasks.
    const int64_t cols = D, r1 = std::min(B, (task + 1) * rows_per_task);
    T* const gmu = dmu;
    T* const glv = dlv;
    T* const geps = deps;
    const V half(A(0.5)), one(A(1));
    for (int64_t r = task * rows_per_task; r < r1; ++r) {
      const V k(dkl ? static_cast<A>(dkl[r]) : A(0));
      const V hk = half * k;
      for_chunks<T>(r * cols, (r + 1) * cols, [&](int64_t i, int64_t m) {
        C cm, cl, ce, cg;
        cm.load(mu + i, m);
        cl.load(lv + i, m);
        if (dz) {
          ce.load(eps + i, m);
          cg.load(dz + i, m);
        }
        for (int k_ = 0; k_ < C::kVecs; ++k_) {
          const V s = (half * cl.v[k_]).exp();
          const V kl_term = hk * (s * s - one);
          if (dz) {
            cl.v[k_] = half * cg.v[k_] * s * ce.v[k_] + kl_term;  // d logvar
            cm.v[k_] = cg.v[k_] + k * cm.v[k_];                  // d mu
            ce.v[k_] = cg.v[k_] * s;                             // d eps
          } else {
            cl.v[k_] = kl_term;
            cm.v[k_] = k * cm.v[k_];
            ce.v[k_] = V(0);
          }
        }
        cm.store(gmu + i, m);
        cl.store(glv + i, m);
        if (geps) ce.store(geps + i, m);
      });
    }
  });
}

void check_inputs(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps) {
  check_dtype(mu, "reparam_kl", "mu");
  check_dtype(logvar, "reparam_kl", "logvar");
  check_dtype(eps, "reparam_kl", "eps");
  TORCH_CHECK(mu.dim() == 2, "vaegan_fast native reparam_kl: mu must be 2-D [B, D], got ", mu.sizes());
  TORCH_CHECK(logvar.sizes() == mu.sizes() && eps.sizes() == mu.sizes(),
              "vaegan_fast native reparam_kl: mu, logvar and eps must have one shape");
  TORCH_CHECK(logvar.scalar_type() == mu.scalar_type() && eps.scalar_type() == mu.scalar_type(),
              "vaegan_fast native reparam_kl: mu, logvar and eps must share one dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reparam_kl(const at::Tensor& mu_, const at::Tensor& logvar_,
                                              const at::Tensor& eps_) {
  check_inputs(mu_, logvar_, eps_);
  auto mu = mu_.contiguous(), logvar = logvar_.contiguous(), eps = eps_.contiguous();
  const int64_t B = mu.size(0), D = mu.size(1);
  auto z = at::empty_like(mu);
  auto kl = at::empty({B}, mu.options());
  if (mu.numel() == 0) return {z, kl.zero_()};
  VFN_DISPATCH(mu.scalar_type(), "reparam_kl", [&] {
    reparam_forward_kernel<scalar_t>(mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(),
                                     eps.const_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(),
                                     kl.mutable_data_ptr<scalar_t>(), B, D);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_kl_backward(
    const at::Tensor& mu_, const at::Tensor& logvar_, const at::Tensor& eps_,
    const std::optional<at::Tensor>& grad_z_, const std::optional<at::Tensor>& grad_kl_, bool need_grad_eps) {
  check_inputs(mu_, logvar_, eps_);
  auto mu = mu_.contiguous(), logvar = logvar_.contiguous(), eps = eps_.contiguous();
  const int64_t B = mu.size(0), D = mu.size(1);
  at::Tensor dz, dkl;
  if (grad_z_.has_value() && grad_z_->defined()) {
    TORCH_CHECK(grad_z_->sizes() == mu.sizes(), "reparam_kl_backward: grad_z must have mu's shape");
    dz = grad_z_->to(mu.scalar_type()).contiguous();
  }
  if (grad_kl_.has_value() && grad_kl_->defined()) {
    TORCH_CHECK(grad_kl_->dim() == 1 && grad_kl_->size(0) == B, "reparam_kl_backward: grad_kl must be [B]");
    dkl = grad_kl_->to(mu.scalar_type()).contiguous();
  }
  auto dmu = at::empty_like(mu), dlv = at::empty_like(mu);
  auto deps = need_grad_eps ? at::empty_like(mu) : at::empty({0}, mu.options());
  if (mu.numel() == 0) return {dmu, dlv, deps};
  VFN_DISPATCH(mu.scalar_type(), "reparam_kl_backward", [&] {
    reparam_backward_kernel<scalar_t>(
        mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(),
        dz.defined() ? dz.const_data_ptr<scalar_t>() : nullptr,
        dkl.defined() ? dkl.const_data_ptr<scalar_t>() : nullptr, dmu.mutable_data_ptr<scalar_t>(),
        dlv.mutable_data_ptr<scalar_t>(), need_grad_eps ? deps.mutable_data_ptr<scalar_t>() : nullptr, B, D);
  });
  return {dmu, dlv, deps};
}

// ---- autograd (in C++: no Python on the dispatch path) ------------------------------------------------
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ReparamKlFunction : public torch::autograd::Function<ReparamKlFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu, const at::Tensor& logvar,
                               const at::Tensor& eps) {
    static const auto op = library_op<decltype(reparam_kl)>("reparam_kl");
    auto [z, kl] = call_below_autograd(op, mu, logvar, eps);
    ctx->save_for_backward({mu, logvar, eps});
    ctx->set_materialize_grads(false);
    return {z, kl};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &mu = saved[0], &logvar = saved[1], &eps = saved[2];
    at::Tensor dz = grads[0], dkl = grads[1];
    const bool need_eps = ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable ATen ops
      auto std_ = at::exp(logvar * 0.5);
      if (!dz.defined()) dz = at::zeros_like(mu);
      if (!dkl.defined()) dkl = at::zeros_like(mu.select(1, 0));
      auto k = dkl.unsqueeze(1);
      return {dz + k * mu, 0.5 * dz * std_ * eps + 0.5 * k * (at::exp(logvar) - 1.0),
              need_eps ? dz * std_ : at::Tensor()};
    }
    static const auto op = library_op<decltype(reparam_kl_backward)>("reparam_kl_backward");
    auto [dmu, dlv, deps] =
        call_below_autograd(op, mu, logvar, eps, dz.defined() ? std::optional<at::Tensor>(dz) : std::nullopt,
                            dkl.defined() ? std::optional<at::Tensor>(dkl) : std::nullopt, need_eps);
    return {dmu, dlv, need_eps ? deps : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reparam_kl_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                                       const at::Tensor& eps) {
  auto out = ReparamKlFunction::apply(mu, logvar, eps);
  return {out[0], out[1]};
}
}  // namespace

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) {
  m.impl("reparam_kl", &reparam_kl);
  m.impl("reparam_kl_backward", &reparam_kl_backward);
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, Autograd, m) { m.impl("reparam_kl", &reparam_kl_autograd); }

}  // namespace vaegan_fast_native
