// The GAN losses on the CPU: loss and gradient in one pass; backward only scales the stored gradient
// (feature_recon: forms it again from the features, which autograd keeps anyway).
//
//   softplus_losses   loss = sum_k c_k / n_k * sum_i softplus(t_i),   t = s_k * x_k[i]
//                     softplus(t) = max(t, 0) + log1p(exp(-|t|))       (stable at any |t|)
//                     d loss / d x_k[i] = c_k * s_k / n_k * sigmoid(t),
//                     sigmoid(t) = (t >= 0 ? 1 : e) / (1 + e) with e = exp(-|t|) (the exp is shared)
//     discriminator_loss(r, f..) = signs (-1, +1, ...), coeffs 1;  generator_loss: signs -1 (non-saturating)
//     or +1 with coeffs -1 (saturating).
//   feature_recon_loss   loss = 0.5 / N * sum (a - b)^2 with N = a.size(0);  d loss / d a = (a - b) / N = -d/d b
//   feature_recon_loss_backward   d a = g / N * (a - b),  d b = -d a: one pass over a and b
//   feature_recon_terms  (loss, d loss / d a) in one pass: the training step's primitive
//   scale_grad        g * stored (and -g * stored): softplus_losses' backward, one pass.
//
// Bytes moved, n elements of size e: softplus_losses reads x (n e) and writes the gradient (n e) when
// autograd needs it (under no_grad only the loss: n e); scale_grad reads n e and writes n e (2 n e for both
// signs). feature_recon_loss reads a and b (2 n e) and writes only the loss; its backward reads a and b (2 n e)
// and writes d a and d b (2 n e): the same 6 n e as storing the gradient in the forward, but one allocation
// fewer and nothing kept for backward beyond the inputs. feature_recon_terms reads 2 n e and writes n e.
// Eager PyTorch: ~8 passes forward, ~10 backward.
//
// Sums: fixed tasks of kTask elements, a partial sum per task (fp32 lanes; fp64 for double inputs), lanes and
// partials added in a fixed order in double: the same result with any thread count.
#include "common.h"

#include <ATen/ops/sigmoid.h>

namespace vaegan_fast_native {
namespace {

// Partial sums of softplus(s * x) over tasks; writes grad = gscale * sigmoid(s * x) when grad != nullptr.
template <typename T>
void softplus_kernel(const T* x, T* grad, int64_t n, acc_t<T> sign, acc_t<T> gscale, double* partials) {
  using A = acc_t<T>;
  for_tasks(ceil_div(n, kTask), [&](int64_t task) {
    const A s = sign, gs = gscale;  // locals: see common.h on captured scalars
    A bx[kBlock], t[kBlock], e[kBlock], l[kBlock], bg[kBlock];
    const int64_t i1 = std::min(n, (task + 1) * kTask);
    double acc = 0;
    for (int64_t i0 = task * kTask; i0 < i1; i0 += kBlock) {
      const int64_t m = std::min(kBlock, i1 - i0);
      const A* v = load(x + i0, bx, m);
      for (int64_t i = 0; i < m; ++i) {
        t[i] = s * v[i];
        e[i] = -std::abs(t[i]);
      }
      vexp(e, e, m);
      vlog1p(e, l, m);
      for (int64_t i = 0; i < m; ++i) l[i] += std::max(t[i], A(0));
      acc += lane_sum(l, m);
      if (grad) {
        A* g = out_ptr(grad + i0, bg);
        for (int64_t i = 0; i < m; ++i) g[i] = gs * (t[i] >= A(0) ? A(1) : e[i]) / (A(1) + e[i]);
        finish(g, grad + i0, m);
      }
    }
    partials[task] = acc;
  });
}

// Per task: the sum of (a - b)^2 into partials[task]; grad = (a - b) * inv_rows where grad != nullptr.
template <typename T>
void feature_recon_kernel(const T* a, const T* b, T* grad, int64_t n, acc_t<T> inv_rows, double* partials) {
  using C = Chunk<T>;
  using V = typename C::V;
  for_tasks(ceil_div(n, kTask), [&](int64_t task) {
    const V scale(inv_rows);  // locals: see for_tasks on captured variables
    T* const g = grad;
    V acc[C::kVecs];
    for (auto& v : acc) v = V(0);
    for_chunks<T>(task * kTask, std::min(n, (task + 1) * kTask), [&](int64_t i, int64_t m) {
      C ca, cb;
      ca.load(a + i, m);
      cb.load(b + i, m);
      for (int k = 0; k < C::kVecs; ++k) {
        ca.v[k] = ca.v[k] - cb.v[k];
        acc[k] = at::vec::fmadd(ca.v[k], ca.v[k], acc[k]);
      }
      if (g) {
        for (int k = 0; k < C::kVecs; ++k) ca.v[k] = ca.v[k] * scale;
        ca.store(g + i, m);
      }
    });
    partials[task] = ordered_lanes(acc);
  });
}

// c into out + i and -c into neg + i, each where its pointer is not null (a gradient and its negation: the
// two inputs of a difference). c is negated in place.
template <typename T>
inline void store_and_negated(Chunk<T>& c, T* out, T* neg, int64_t i, int64_t m) {
  if (out) c.store(out + i, m);
  if (neg) {
    for (int k = 0; k < Chunk<T>::kVecs; ++k) c.v[k] = c.v[k].neg();
    c.store(neg + i, m);
  }
}

// da = scale * (a - b) and db = -da, each where its pointer is not null: feature_recon's backward.
template <typename T>
void feature_recon_backward_kernel(const T* a, const T* b, T* da, T* db, int64_t n, acc_t<T> scale) {
  using C = Chunk<T>;
  using V = typename C::V;
  for_tasks(ceil_div(n, kTask), [&](int64_t task) {
    const V s(scale);  // locals: see for_tasks on captured variables
    T* const pa = da;
    T* const pb = db;
    for_chunks<T>(task * kTask, std::min(n, (task + 1) * kTask), [&](int64_t i, int64_t m) {
      C ca, cb;
      ca.load(a + i, m);
      cb.load(b + i, m);
      for (int k = 0; k < C::kVecs; ++k) ca.v[k] = (ca.v[k] - cb.v[k]) * s;
      store_and_negated(ca, pa, pb, i, m);
    });
  });
}

// out = g * stored, neg = -(g * stored) where neg != nullptr.
template <typename T>
void scale_kernel(const T* stored, T* out, T* neg, int64_t n, acc_t<T> g) {
  using C = Chunk<T>;
  using V = typename C::V;
  for_tasks(ceil_div(n, kTask), [&](int64_t task) {
    const V gv(g);  // locals: see for_tasks on captured variables
    T* const o = out;
    T* const q = neg;
    for_chunks<T>(task * kTask, std::min(n, (task + 1) * kTask), [&](int64_t i, int64_t m) {
      C c;
      c.load(stored + i, m);
      for (int k = 0; k < C::kVecs; ++k) c.v[k] = gv * c.v[k];
      store_and_negated(c, o, q, i, m);
    });
  });
}

double ordered_sum(const std::vector<double>& partials) {
  double s = 0;
  for (double p : partials) s += p;
  return s;
}

}  // namespace

std::vector<at::Tensor> softplus_losses(at::TensorList xs, at::ArrayRef<double> signs,
                                        at::ArrayRef<double> coeffs, bool need_grad) {
  TORCH_CHECK(!xs.empty(), "vaegan_fast native softplus_losses: needs at least one tensor");
  TORCH_CHECK(signs.size() == xs.size() && coeffs.size() == xs.size(),
              "vaegan_fast native softplus_losses: one sign and one coefficient per tensor");
  const auto dtype = xs[0].scalar_type();
  std::vector<at::Tensor> out(xs.size() + 1);
  double total = 0;
  for (size_t k = 0; k < xs.size(); ++k) {
    check_dtype(xs[k], "softplus_losses", "logits");
    TORCH_CHECK(xs[k].scalar_type() == dtype, "vaegan_fast native softplus_losses: one dtype for all logits");
    TORCH_CHECK(xs[k].numel() > 0, "vaegan_fast native softplus_losses: logits must not be empty");
    auto x = xs[k].contiguous();
    const int64_t n = x.numel();
    at::Tensor grad = need_grad ? at::empty(xs[k].sizes(), x.options()) : at::empty({0}, x.options());
    std::vector<double> partials(ceil_div(n, kTask), 0.0);
    VFN_DISPATCH(dtype, "softplus_losses", [&] {
      using A = acc_t<scalar_t>;
      softplus_kernel<scalar_t>(x.const_data_ptr<scalar_t>(),
                                need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, n, A(signs[k]),
                                A(coeffs[k] * signs[k] / double(n)), partials.data());
    });
    total += coeffs[k] * ordered_sum(partials) / double(n);
    out[k + 1] = grad;
  }
  out[0] = at::scalar_tensor(total, xs[0].options().dtype(dtype));
  return out;
}

std::tuple<at::Tensor, at::Tensor> feature_recon(const at::Tensor& a_, const at::Tensor& b_, bool need_grad) {
  check_dtype(a_, "feature_recon_loss", "features_real");
  check_dtype(b_, "feature_recon_loss", "features_fake");
  TORCH_CHECK(a_.sizes() == b_.sizes() && a_.scalar_type() == b_.scalar_type(),
              "vaegan_fast native feature_recon_loss: features must share one shape and dtype");
  TORCH_CHECK(a_.dim() >= 1 && a_.size(0) > 0 && a_.numel() > 0,
              "vaegan_fast native feature_recon_loss: features must have a non-empty batch");
  auto a = a_.contiguous(), b = b_.contiguous();
  const int64_t n = a.numel(), rows = a.size(0);
  at::Tensor grad = need_grad ? at::empty(a_.sizes(), a.options()) : at::Tensor();
  std::vector<double> partials(ceil_div(n, kTask), 0.0);
  VFN_DISPATCH(a.scalar_type(), "feature_recon_loss", [&] {
    using A = acc_t<scalar_t>;
    feature_recon_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                   need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, n,
                                   A(1.0 / double(rows)), partials.data());
  });
  const double loss = 0.5 * ordered_sum(partials) / double(rows);
  return {at::scalar_tensor(loss, a.options()), grad};
}

at::Tensor feature_recon_loss(const at::Tensor& a, const at::Tensor& b) {
  return std::get<0>(feature_recon(a, b, false));
}

std::tuple<at::Tensor, at::Tensor> feature_recon_terms(const at::Tensor& a, const at::Tensor& b) {
  return feature_recon(a, b, true);
}

std::tuple<at::Tensor, at::Tensor> feature_recon_loss_backward(const at::Tensor& a_, const at::Tensor& b_,
                                                               const at::Tensor& grad,
                                                               std::array<bool, 2> output_mask) {
  check_dtype(a_, "feature_recon_loss_backward", "features_real");
  check_dtype(b_, "feature_recon_loss_backward", "features_fake");
  TORCH_CHECK(a_.sizes() == b_.sizes() && a_.scalar_type() == b_.scalar_type(),
              "vaegan_fast native feature_recon_loss_backward: features must share one shape and dtype");
  TORCH_CHECK(a_.dim() >= 1 && a_.size(0) > 0, "vaegan_fast native feature_recon_loss_backward: empty batch");
  TORCH_CHECK(grad.numel() == 1, "vaegan_fast native feature_recon_loss_backward: grad must be a scalar");
  auto a = a_.contiguous(), b = b_.contiguous();
  // an output not asked for is an empty tensor (the schema's rule), allocated only then
  at::Tensor da = at::empty(output_mask[0] ? a_.sizes() : at::IntArrayRef{0}, a.options());
  at::Tensor db = at::empty(output_mask[1] ? a_.sizes() : at::IntArrayRef{0}, a.options());
  const double scale = grad.item<double>() / double(a.size(0));
  VFN_DISPATCH(a.scalar_type(), "feature_recon_loss_backward", [&] {
    using A = acc_t<scalar_t>;
    feature_recon_backward_kernel<scalar_t>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        output_mask[0] ? da.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? db.mutable_data_ptr<scalar_t>() : nullptr, a.numel(), A(scale));
  });
  return {da, db};
}

std::tuple<at::Tensor, at::Tensor> scale_grad(const at::Tensor& stored_, const at::Tensor& grad,
                                              bool want_negated) {
  check_dtype(stored_, "scale_grad", "stored");
  TORCH_CHECK(grad.numel() == 1, "vaegan_fast native scale_grad: grad must be a scalar");
  auto stored = stored_.contiguous();
  auto out = at::empty(stored_.sizes(), stored.options());
  auto neg = want_negated ? at::empty(stored_.sizes(), stored.options()) : at::empty({0}, stored.options());
  const double g = grad.item<double>();
  VFN_DISPATCH(stored.scalar_type(), "scale_grad", [&] {
    using A = acc_t<scalar_t>;
    scale_kernel<scalar_t>(stored.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                           want_negated ? neg.mutable_data_ptr<scalar_t>() : nullptr, stored.numel(), A(g));
  });
  return {out, neg};
}

// ---- autograd (in C++: no Python on the dispatch path) ------------------------------------------------
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor scale(const at::Tensor& stored, const at::Tensor& g) {
  static const auto op = library_op<decltype(scale_grad)>("scale_grad");
  return std::get<0>(call_below_autograd(op, stored, g, false));
}

class SoftplusLossesFunction : public torch::autograd::Function<SoftplusLossesFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, std::vector<double> signs,
                               std::vector<double> coeffs, bool need_grad) {
    static const auto op = library_op<decltype(softplus_losses)>("softplus_losses");
    auto out = call_below_autograd(op, xs, signs, coeffs, need_grad);
    std::vector<at::Tensor> to_save(xs.begin(), xs.end());
    to_save.insert(to_save.end(), out.begin() + 1, out.end());
    ctx->save_for_backward(to_save);
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    ctx->set_materialize_grads(false);  // else autograd allocates zeros for every stored-gradient output
    ctx->saved_data["signs"] = signs;
    ctx->saved_data["coeffs"] = coeffs;
    ctx->saved_data["need_grad"] = need_grad;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() / 2;
    auto signs = ctx->saved_data["signs"].toDoubleVector();
    auto coeffs = ctx->saved_data["coeffs"].toDoubleVector();
    const bool stored = ctx->saved_data["need_grad"].toBool();
    const at::Tensor& g = grads[0];
    variable_list out(n + 3);
    if (!g.defined()) return out;  // the loss is unused: no gradient
    for (size_t k = 0; k < n; ++k) {
      if (!ctx->needs_input_grad(k)) continue;
      if (at::GradMode::is_enabled() || !stored) {  // create_graph=True: differentiable ATen ops
        const at::Tensor& x = saved[k];
        out[k] = g * (coeffs[k] * signs[k] / double(x.numel())) * at::sigmoid(x * signs[k]);
      } else {
        out[k] = scale(saved[n + k], g);
      }
    }
    return out;
  }
};

std::vector<at::Tensor> softplus_losses_autograd(at::TensorList xs, at::ArrayRef<double> signs,
                                                 at::ArrayRef<double> coeffs, bool need_grad) {
  return SoftplusLossesFunction::apply(xs, signs.vec(), coeffs.vec(), need_grad);
}

class FeatureReconFunction : public torch::autograd::Function<FeatureReconFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    static const auto op = library_op<decltype(feature_recon_loss)>("feature_recon_loss");
    ctx->save_for_backward({a, b});  // the backward forms the gradient again from them (header)
    return call_below_autograd(op, a, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool need_a = ctx->needs_input_grad(0), need_b = ctx->needs_input_grad(1);
    const at::Tensor& g = grads[0];
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable ATen ops
      auto da = g * (saved[0] - saved[1]) / double(saved[0].size(0));
      return {need_a ? da : at::Tensor(), need_b ? -da : at::Tensor()};
    }
    static const auto op = library_op<decltype(feature_recon_loss_backward)>("feature_recon_loss_backward");
    auto [da, db] = call_below_autograd(op, saved[0], saved[1], g, std::array<bool, 2>{need_a, need_b});
    return {need_a ? da : at::Tensor(), need_b ? db : at::Tensor()};
  }
};

at::Tensor feature_recon_loss_autograd(const at::Tensor& a, const at::Tensor& b) {
  return FeatureReconFunction::apply(a, b);
}
}  // namespace

TORCH_LIBRARY_IMPL(vaegan_fast_native, Autograd, m) {
  m.impl("softplus_losses", &softplus_losses_autograd);
  m.impl("feature_recon_loss", &feature_recon_loss_autograd);
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) {
  m.impl("softplus_losses", &softplus_losses);
  m.impl("feature_recon_loss", &feature_recon_loss);
  m.impl("feature_recon_terms", &feature_recon_terms);
  m.impl("feature_recon_loss_backward", &feature_recon_loss_backward);
  m.impl("scale_grad", &scale_grad);
}

}  // namespace vaegan_fast_native
