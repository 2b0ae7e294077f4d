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
  using A = acc_t<T>;
  const int64_t rows_per_task = std::max<int64_t>(1, kTask / D);
  for_tasks(ceil_div(B, rows_per_task), [&](int64_t task) {
    A bm[kBlock], bl[kBlock], be[kBlock], bz[kBlock], s[kBlock], w[kBlock];
    const int64_t r1 = std::min(B, (task + 1) * rows_per_task);
    for (int64_t r = task * rows_per_task; r < r1; ++r) {
      A acc = 0;
      for (int64_t j0 = 0; j0 < D; j0 += kBlock) {
        const int64_t n = std::min(kBlock, D - j0), off = r * D + j0;
        const A* m = load(mu + off, bm, n);
        const A* l = load(lv + off, bl, n);
        const A* e = load(eps + off, be, n);
        for (int64_t i = 0; i < n; ++i) w[i] = A(0.5) * l[i];
        vexp(w, s, n);
        A* zo = out_ptr(z + off, bz);
        for (int64_t i = 0; i < n; ++i) {
          zo[i] = m[i] + s[i] * e[i];
          w[i] = m[i] * m[i] + s[i] * s[i] - l[i] - A(1);
        }
        finish(zo, z + off, n);
        acc += lane_sum(w, n);
      }
      kl[r] = static_cast<T>(A(0.5) * acc);
    }
  });
}

template <typename T>
void reparam_backward_kernel(const T* mu, const T* lv, const T* eps, const T* dz, const T* dkl, T* dmu,
                             T* dlv, T* deps, int64_t B, int64_t D) {
  using A = acc_t<T>;
  const int64_t rows_per_task = std::max<int64_t>(1, kTask / D);
  for_tasks(ceil_div(B, rows_per_task), [&](int64_t task) {
    A bm[kBlock], bl[kBlock], be[kBlock], bdz[kBlock], s[kBlock], w[kBlock], o1[kBlock], o2[kBlock],
        o3[kBlock];
    const int64_t r1 = std::min(B, (task + 1) * rows_per_task);
    for (int64_t r = task * rows_per_task; r < r1; ++r) {
      const A k = dkl ? static_cast<A>(dkl[r]) : A(0);
      const A hk = A(0.5) * k;
      for (int64_t j0 = 0; j0 < D; j0 += kBlock) {
        const int64_t n = std::min(kBlock, D - j0), off = r * D + j0;
        const A* m = load(mu + off, bm, n);
        const A* l = load(lv + off, bl, n);
        for (int64_t i = 0; i < n; ++i) w[i] = A(0.5) * l[i];
        vexp(w, s, n);
        A* gm = out_ptr(dmu + off, o1);
        A* gl = out_ptr(dlv + off, o2);
        if (dz) {
          const A* e = load(eps + off, be, n);
          const A* g = load(dz + off, bdz, n);
          for (int64_t i = 0; i < n; ++i) {
            gm[i] = g[i] + k * m[i];
            gl[i] = A(0.5) * g[i] * s[i] * e[i] + hk * (s[i] * s[i] - A(1));
          }
          if (deps) {
            A* ge = out_ptr(deps + off, o3);
            for (int64_t i = 0; i < n; ++i) ge[i] = g[i] * s[i];
            finish(ge, deps + off, n);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            gm[i] = k * m[i];
            gl[i] = hk * (s[i] * s[i] - A(1));
          }
          if (deps) std::fill(deps + off, deps + off + n, T(0));
        }
        finish(gm, dmu + off, n);
        finish(gl, dlv + off, n);
      }
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
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("vaegan_fast_native::reparam_kl", "")
                         .typed<decltype(reparam_kl)>();
    auto [z, kl] = op.call(mu, logvar, eps);
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
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("vaegan_fast_native::reparam_kl_backward", "")
                         .typed<decltype(reparam_kl_backward)>();
    auto [dmu, dlv, deps] = op.call(mu, logvar, eps, dz.defined() ? std::optional<at::Tensor>(dz) : std::nullopt,
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
