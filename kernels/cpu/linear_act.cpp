// linear_act on the CPU: GEMM through common.h's product_mm (BLAS or oneDNN), bias and activation in one pass over
// its output.
//
//   forward   a = x @ weight.T                      product_mm, x [M, K], weight [N, K]
//             y = act(a + bias)                     one pass over a (in place when y is all backward needs);
//                                                   identity: product_addmm adds the bias inside the GEMM
//   backward  ga = grad_y * act'(.)                 one pass; the bias gradient (column sums of ga) is
//                                                   accumulated in the same pass
//             grad_x = ga @ weight, grad_weight = ga.T @ x     product_mm, the two side by side on two threads
//
//   act'(.) is formed from y where that is exact: relu (y > 0), leaky_relu with slope > 0 (y > 0 ? 1 : s),
//   tanh (1 - y^2), sigmoid (y (1 - y)), identity (no pass at all); gelu (tanh form) and leaky_relu with a
//   slope <= 0 need the pre-activation a + bias, which the forward then keeps as a second output. The
//   activations and derivatives are exactly those of torch (vaegan_fast/ops/linear_act.py is the spec):
//     gelu(a) = 0.5 a (1 + tanh(k0 (a + k1 a^3))),  k0 = sqrt(2/pi), k1 = 0.044715
//     gelu'(a) = 0.5 (1 + th) + 0.5 a (1 - th^2) k0 (1 + 3 k1 a^2),  th = tanh(k0 (a + k1 a^3))
//
// Bytes moved besides the GEMMs, M x N outputs of size e: forward reads and writes a once (2 MNe; + MNe when
// the pre-activation is kept; none for the identity); backward reads grad_y and the saved tensor and writes ga
// (3 MNe). Eager PyTorch: addmm's bias copy, the activation (2 MNe), and backward's activation derivative
// (3 MNe) plus a separate bias-gradient reduction (MNe), with one dispatch per op.
//
// bf16, fp32 product path (CPUs without bf16 units): the operands are upcast and the GEMMs, bias and activation
// run in fp32, rounded to bf16 once (there a bf16 GEMM is ~10-20x slower than the upcast plus an fp32 GEMM).
// bf16 product path (common.h's product_dtype): the GEMMs run on the bf16 operands (oneDNN, fp32
// accumulation, the bias added inside the GEMM, rounded to bf16 once), the activation in fp32 registers. The
// derivative pass reads bf16 grad_y and writes bf16 ga, as eager does. The bias gradient is summed in fp32 (fp64 for
// double) per row-task, tasks added in order: independent of the thread count.
#include "activation.h"
#include "common.h"

#include <ATen/ops/gelu.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <torch/csrc/autograd/autograd.h>

namespace vaegan_fast_native {
namespace {

// Over a [M, N]: y <- act(a + bias), and pre <- a + bias where pre is given. In place when In and Out are one
// type (y and pre may be a itself); on bf16's fp32 product path In is the fp32 product and Out bf16, rounded
// once at the store. Rows go in register chunks (common.h): with N of 32 to 128 a block loop per row had cost
// more in its set-up than in its arithmetic.
template <int64_t Act, typename In, typename Out>
void epilogue_kernel(const In* a, Out* pre, Out* y, const acc_t<In>* bias, int64_t M, int64_t N, acc_t<In> slope) {
  using A = acc_t<In>;
  using C = Chunk<In>;
  using V = typename C::V;
  static_assert(std::is_same_v<V, typename Chunk<Out>::V> && C::kSize == Chunk<Out>::kSize);
  const int64_t rows_per_task = std::max<int64_t>(1, kTask / N);
  for_tasks(ceil_div(M, rows_per_task), [&](int64_t task) {
    // Locals, not captures: see for_tasks on captured variables.
    const In* const a_ = a;
    Out* const pre_ = pre;
    Out* const y_ = y;
    const A* const bias_ = bias;
    const int64_t cols = N, r1 = std::min(M, (task + 1) * rows_per_task);
    const V slope_(slope);
    for (int64_t r = task * rows_per_task; r < r1; ++r) {
      const In* const arow = a_ + r * cols;
      Out* const yrow = y_ + r * cols;
      for_chunks<In>(0, cols, [&](int64_t j, int64_t m) {
        C c;
        c.load(arow + j, m);
        Chunk<Out> o;
        if (bias_) {
          Chunk<A> cb;
          cb.load(bias_ + j, m);
          for (int k = 0; k < C::kVecs; ++k) c.v[k] = c.v[k] + cb.v[k];
        }
        if (pre_) {
          for (int k = 0; k < C::kVecs; ++k) o.v[k] = c.v[k];
          o.store(pre_ + r * cols + j, m);
        }
        for (int k = 0; k < C::kVecs; ++k) o.v[k] = activate<Act>(c.v[k], slope_);
        o.store(yrow + j, m);
      });
    }
  });
}

// ga = grad_y * act'(saved), stored as G (T, or fp32 on bf16's fp32 product path, where the GEMMs read it); for the
// identity ga is grad_y itself, stored only where ga is given (that fp32 copy). Column sums of ga into bias_grad
// (when not null), per row-task in fp32 (fp64 for double) and the tasks added in order.
template <int64_t Act, typename T, typename G>
void backward_kernel(const T* gy, const T* saved, G* ga, acc_t<T>* bias_grad, int64_t M, int64_t N,
                     acc_t<T> slope) {
  using A = acc_t<T>;
  using C = Chunk<T>;
  using V = typename C::V;
  const int64_t rows_per_task = std::max<int64_t>(1, kTask / N);
  const int64_t ntasks = ceil_div(M, rows_per_task);
  std::vector<A> partials(bias_grad ? ntasks * N : 0, A(0));
  for_tasks(ntasks, [&](int64_t task) {
    // Locals, not captures: see for_tasks on captured variables.
    const T* const gy_ = gy;
    const T* const saved_ = saved;
    G* const ga_ = ga;
    const int64_t cols = N, r1 = std::min(M, (task + 1) * rows_per_task);
    const V slope_(slope);
    A* const col = bias_grad ? partials.data() + task * cols : nullptr;
    for (int64_t r = task * rows_per_task; r < r1; ++r) {
      const int64_t off = r * cols;
      for_chunks<T>(0, cols, [&](int64_t j, int64_t m) {
        C g;
        g.load(gy_ + off + j, m);
        if constexpr (Act != kIdentity) {
          C s;
          s.load(saved_ + off + j, m);
          for (int k = 0; k < C::kVecs; ++k) g.v[k] = derivative<Act>(g.v[k], s.v[k], slope_);
        }
        if (Act != kIdentity || ga_) {
          Chunk<G> o;
          for (int k = 0; k < C::kVecs; ++k) o.v[k] = g.v[k];
          o.store(ga_ + off + j, m);
        }
        if (col) {
          Chunk<A> c;
          c.load(col + j, m);
          for (int k = 0; k < C::kVecs; ++k) c.v[k] = c.v[k] + g.v[k];
          c.store(col + j, m);
        }
      });
    }
  });
  if (bias_grad) {
    for (int64_t j = 0; j < N; ++j) bias_grad[j] = A(0);
    for (int64_t t = 0; t < ntasks; ++t) {
      const A* p = partials.data() + t * N;
      for (int64_t j = 0; j < N; ++j) bias_grad[j] += p[j];
    }
  }
}

void check_linear(const at::Tensor& x, const at::Tensor& weight, int64_t act) {
  check_dtype(x, "linear_act", "x");
  check_dtype(weight, "linear_act", "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "vaegan_fast native linear_act: x must be [M, K] and weight [N, K], got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "vaegan_fast native linear_act: one dtype for all inputs");
  TORCH_CHECK(act >= kIdentity && act <= kGelu, "vaegan_fast native linear_act: unknown activation ", act);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_act(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias_, int64_t act, double slope) {
  check_linear(x, weight, act);
  const int64_t M = x.size(0), N = weight.size(0);
  const bool has_bias = bias_.has_value() && bias_->defined();
  if (has_bias) {
    check_dtype(*bias_, "linear_act", "bias");
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N && bias_->scalar_type() == x.scalar_type(),
                "vaegan_fast native linear_act: bias must be [N] of the inputs' dtype");
  }
  const bool keep_pre = keeps_preactivation(act, slope);
  // bf16 on the fp32 product path: GEMM, bias and activation in fp32, rounded once as the epilogue stores y (and
  // the pre-activation). x86 CPUs without AVX512-BF16 run bf16 GEMMs about 10-20x slower than fp32 ones, so
  // upcasting the operands (a pass over x and W) is far cheaper than the bf16 GEMM and rounds less.
  const bool upcast = product_dtype(x.scalar_type()) != x.scalar_type();
  const at::Tensor xp = upcast ? x.to(at::kFloat) : x, wp = upcast ? weight.to(at::kFloat) : weight;
  std::optional<at::Tensor> bp;
  if (has_bias) bp = upcast ? bias_->to(at::kFloat) : *bias_;
  if (act == kIdentity) {
    // No activation: BLAS adds the bias itself (beta = 1 over the bias rows), in the same pass that writes
    // the product, instead of a second pass over the output.
    at::Tensor a = bp ? product_addmm(*bp, xp, wp.t()) : product_mm(xp, wp.t());
    if (!a.is_contiguous()) a = a.contiguous();
    return {upcast ? a.to(at::kBFloat16) : a, at::empty({0}, x.options())};
  }
  // bf16 products: the bias goes inside the GEMM too (oneDNN adds it to the fp32 accumulator), so the
  // pre-activation is rounded to bf16 once, as eager's addmm rounds it. Added after a rounded product instead,
  // values near zero changed sign against the fp64 reference where eager's did not, and each flipped a relu
  // mask entry: a weight-gradient error of |g x| (measured: 14 flips in 257x65, 60x eager's error).
  const bool bias_in_gemm = has_bias && xp.scalar_type() == at::kBFloat16;
  at::Tensor a = bias_in_gemm ? product_addmm(*bp, xp, wp.t()) : product_mm(xp, wp.t());
  if (!a.is_contiguous()) a = a.contiguous();
  const bool add_bias = has_bias && !bias_in_gemm;
  // The outputs: in place over a (the pre-activation is a itself, rewritten only when the bias is added here),
  // or, upcast, fresh bf16 tensors.
  at::Tensor y = upcast ? at::empty({M, N}, x.options()) : (keep_pre ? at::empty_like(a) : a);
  at::Tensor pre = upcast ? at::empty({keep_pre ? M : 0, N}, x.options()) : a;
  if (M * N > 0) {
    VFN_DISPATCH(a.scalar_type(), "linear_act", [&] {
      using A = acc_t<scalar_t>;
      std::vector<A> bias_acc;
      if (add_bias) {
        auto b = bp->to(c10::CppTypeToScalarType<A>::value).contiguous();
        bias_acc.assign(b.const_data_ptr<A>(), b.const_data_ptr<A>() + N);
      }
      const A* const bias_p = add_bias ? bias_acc.data() : nullptr;
      with_activation(act, [&](auto activation) {
        constexpr int64_t Act = decltype(activation)::value;
        if constexpr (std::is_same_v<scalar_t, float>)
          if (upcast)
            return epilogue_kernel<Act, float, c10::BFloat16>(
                a.const_data_ptr<float>(), keep_pre ? pre.mutable_data_ptr<c10::BFloat16>() : nullptr,
                y.mutable_data_ptr<c10::BFloat16>(), bias_p, M, N, A(slope));
        scalar_t* const ap = a.mutable_data_ptr<scalar_t>();
        epilogue_kernel<Act, scalar_t, scalar_t>(ap, keep_pre && add_bias ? ap : nullptr,
                                                 y.mutable_data_ptr<scalar_t>(), bias_p, M, N, A(slope));
      });
    });
  }
  return {y, keep_pre ? pre : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& saved_,
    bool saved_is_output, int64_t act, double slope, std::array<bool, 3> mask) {
  check_linear(x, weight, act);
  const int64_t M = x.size(0), N = weight.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "vaegan_fast native linear_act_backward: grad_y must be [M, N]");
  TORCH_CHECK(act == kIdentity || saved_is_output != keeps_preactivation(act, slope),
              "vaegan_fast native linear_act_backward: saved tensor does not match the activation");
  auto gy = grad_y.to(x.scalar_type()).contiguous();
  // bf16 on the fp32 product path: the GEMMs upcast their operands, as in the forward, and ga is written in
  // fp32 by the derivative pass itself (unrounded: the product then reads what eager's fp32 would).
  const bool bf16 = product_dtype(x.scalar_type()) != x.scalar_type();
  at::Tensor ga = gy, bias_grad = at::empty({0}, x.options());
  // On the fp32 product path the pass also writes the identity's fp32 ga, with the bias sums in the same read of
  // grad_y (a cast and then a sum had read it twice).
  const bool fp32_ga = bf16 && (mask[0] || mask[1]);
  if (act != kIdentity || mask[2] || fp32_ga) {
    at::Tensor saved = act == kIdentity ? at::Tensor() : saved_.contiguous();
    if (saved.defined())
      TORCH_CHECK(saved.sizes() == gy.sizes() && saved.scalar_type() == gy.scalar_type(),
                  "vaegan_fast native linear_act_backward: saved must be [M, N] of the inputs' dtype");
    if (act != kIdentity || fp32_ga) ga = at::empty_like(gy, bf16 ? gy.options().dtype(at::kFloat) : gy.options());
    VFN_DISPATCH(x.scalar_type(), "linear_act_backward", [&] {
      using A = acc_t<scalar_t>;
      std::vector<A> bg(mask[2] ? N : 0);
      const scalar_t* const saved_p = saved.defined() ? saved.const_data_ptr<scalar_t>() : nullptr;
      with_activation(act, [&](auto activation) {
        constexpr int64_t Act = decltype(activation)::value;
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
          if (bf16 && (act != kIdentity || fp32_ga))
            return backward_kernel<Act, scalar_t, float>(gy.const_data_ptr<scalar_t>(), saved_p,
                                                         ga.mutable_data_ptr<float>(), mask[2] ? bg.data() : nullptr,
                                                         M, N, A(slope));
        backward_kernel<Act, scalar_t, scalar_t>(gy.const_data_ptr<scalar_t>(), saved_p,
                                                   act != kIdentity ? ga.mutable_data_ptr<scalar_t>() : nullptr,
                                                   mask[2] ? bg.data() : nullptr, M, N, A(slope));
      });
      if (mask[2]) {
        bias_grad = at::empty({N}, x.options());
        scalar_t* p = bias_grad.mutable_data_ptr<scalar_t>();
        for (int64_t j = 0; j < N; ++j) p[j] = static_cast<scalar_t>(bg[j]);
      }
    });
  }
  // ga as the GEMMs read it: in fp32 on the fp32 product path (the pass above wrote it so; fp32_ga).
  at::Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, x.options());
  auto grad_input = [&] { gx = product_mm(ga, bf16 ? weight.to(at::kFloat) : weight); };
  auto grad_weight = [&] { gw = product_mm(ga.t(), bf16 ? x.to(at::kFloat) : x); };
  // The two products are independent: on two threads they run side by side, one thread each (BLAS runs
  // single-threaded inside a parallel region). BLAS's own two-thread split of one small product spends much
  // of its time in OpenMP's fork and join; of a large one it does not, and there one thread per product is
  // slower (docs/performance.md): side by side up to kLargeProductMacs multiply-adds per product.
  // With 1 or 2 threads each product is then computed by single-threaded BLAS: the same bits either way.
  if (mask[0] && mask[1] && at::get_num_threads() <= 2 && !at::in_parallel_region() &&
      M * N * x.size(1) <= kLargeProductMacs) {
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t which = begin; which < end; ++which) which == 0 ? grad_input() : grad_weight();
    });
  } else {
    if (mask[0]) grad_input();
    if (mask[1]) grad_weight();
  }
  if (bf16) {
    if (mask[0]) gx = gx.to(at::kBFloat16);
    if (mask[1]) gw = gw.to(at::kBFloat16);
  }
  return {gx, gw, bias_grad};
}

// ---- autograd (in C++: no Python on the dispatch path) ------------------------------------------------
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor activation_reference(const at::Tensor& a, int64_t act, double slope) {
  switch (act) {
    case kRelu: return at::relu(a);
    case kLeaky: return at::leaky_relu(a, slope);
    case kTanh: return at::tanh(a);
    case kSigmoid: return at::sigmoid(a);
    case kGelu: return at::gelu(a, "tanh");
    default: return a;
  }
}

class LinearActFunction : public torch::autograd::Function<LinearActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t act, double slope) {
    static const auto op = library_op<decltype(linear_act)>("linear_act");
    auto [y, pre] = call_below_autograd(op, x, weight, bias, act, slope);
    const bool keep_pre = keeps_preactivation(act, slope);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, has_bias ? *bias : at::Tensor(), keep_pre ? pre : y});
    ctx->mark_non_differentiable({pre});
    ctx->set_materialize_grads(false);  // else autograd allocates zeros shaped like pre in every backward
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    return {y, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &kept = saved[3];
    const int64_t act = ctx->saved_data["act"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                bias.defined() && ctx->needs_input_grad(2)};
    const at::Tensor& gy = grads[0];
    if (!gy.defined()) return variable_list(5);  // y is unused: no gradient
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiate the ATen reference
      variable_list wrt;
      for (const at::Tensor* t : {&x, &weight, &bias})
        if (t->defined() && t->requires_grad()) wrt.push_back(*t);
      auto y = activation_reference(at::linear(x, weight, bias.defined() ? std::optional<at::Tensor>(bias)
                                                                           : std::nullopt), act, slope);
      auto g = torch::autograd::grad({y}, wrt, {gy}, /*retain_graph=*/true, /*create_graph=*/true,
                                     /*allow_unused=*/true);
      variable_list out(5);
      size_t i = 0;
      const at::Tensor* all[3] = {&x, &weight, &bias};
      for (int k = 0; k < 3; ++k)
        if (all[k]->defined() && all[k]->requires_grad()) {
          out[k] = mask[k] ? g[i] : at::Tensor();
          ++i;
        }
      return out;
    }
    static const auto op = library_op<decltype(linear_act_backward)>("linear_act_backward");
    auto [gx, gw, gb] =
        call_below_autograd(op, gy, x, weight, kept, !keeps_preactivation(act, slope), act, slope, mask);
    return {mask[0] ? gx : at::Tensor(), mask[1] ? gw : at::Tensor(), mask[2] ? gb : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> linear_act_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, int64_t act,
                                                       double slope) {
  auto out = LinearActFunction::apply(x, weight, bias, act, slope);
  return {out[0], out[1]};
}
}  // namespace

TORCH_LIBRARY_IMPL(vaegan_fast_native, Autograd, m) { m.impl("linear_act", &linear_act_autograd); }

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace vaegan_fast_native
