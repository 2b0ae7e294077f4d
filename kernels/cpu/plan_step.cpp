// The executor of a training step's plan in C++ (the plan: vaegan_fast/step/plan.py; its specification, the
// Python executor: vaegan_fast/step/execute.py, which documents every op). One op call runs the whole plan over
// the native kernels, in the order and with the calls the Python executor makes on the native backend, so the
// two agree bit for bit (tests/test_plan_step.py); what it removes is the framework's cost between the kernels
// (on the "seed" preset about 80 op calls from Python, each through argument parsing and the dispatcher).
//
// Arguments (encoded by vaegan_fast/ops/layer/native.py's plan_step_native):
//   inputs            the plan's first slots: x, eps, z_prior (None where the mode has none)
//   program           per instruction: op code (plan.OPS), n_in, slots..., n_out, slots..., n_int, ints...,
//                     n_float; the floats are the next n_float values of program_floats
//   layers, layer_table, layer_floats
//                     per network (encoder, decoder, discriminator): the layer count, then per layer
//                     kind (0 dense, 1 conv2d, 2 conv_transpose2d, 3 flatten, 4 unflatten), has_bias, norm,
//                     activation, stride[2], padding[2], output_padding[2], and the per-sample output shape
//                     (its length, then its sizes); floats slope, eps, momentum; tensors weight, bias, norm
//                     weight, norm bias, running mean, running variance, batches tracked (None where absent),
//                     in the compute dtype as the Python executor receives them
//   networks          the networks whose gradients come back, in order
//   outputs           the slots of the losses returned after the gradients
//   master_grads      the gradients in the parameters' own dtype (else in the step's: see param_grads)
// Returns each trained network's gradients in its parameter order, then the loss slots.
#include "activation.h"
#include "common.h"
#include "ops.h"

#include <ATen/record_function.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros_like.h>

namespace vaegan_fast_native {
namespace {

enum LayerKind : int64_t { kDenseLayer = 0, kConvLayer = 1, kConvTLayer = 2, kFlatten = 3, kUnflatten = 4 };

// plan.OPS, in order.
enum Op : int64_t {
  kForward, kSplit, kClamp, kReparam, kCat, kImageHead, kRows, kFeatureRecon, kUSeed, kSoftplus, kSoftplusMean,
  kMean, kCombine, kBackward, kImageHeadBackward, kSigmoidBackward, kPixelGrad, kReparamBackward, kClampBackward,
  kCatCols, kScale, kCast, kViewRows, kScaleRows
};

struct Layer {
  int64_t kind, activation;
  bool has_bias, norm;
  std::vector<int64_t> stride, padding, output_padding, out_shape;
  double slope, eps, momentum;
  std::optional<at::Tensor> weight, bias, norm_weight, norm_bias, running_mean, running_var, tracked;
  at::ScalarType param_dtype = at::kFloat;  // the parameters' own dtype (fp32 master weights of a bf16 step)
};

struct Cache {
  at::Tensor x, pre, kept, mean, rstd;
  at::Tensor windows;  // a column-path conv2d's window rows of x (fused_layer.cpp), for its weight gradient
};

struct Network {
  std::vector<Layer> layers;
  std::vector<Cache> caches;
  int64_t groups = 1;
  std::vector<std::array<at::Tensor, 4>> grads;  // per layer: dW, db, dgamma, dbeta
  bool has_grads = false;
};

bool channels_last_only(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// execute.py's rows_view, from_rows, scale_rows and like_layout.
at::Tensor rows_view(const at::Tensor& t) {
  if (channels_last_only(t)) return t.permute({0, 2, 3, 1}).reshape({t.size(0), -1});
  return t.reshape({t.size(0), -1});
}

at::Tensor from_rows(const at::Tensor& g, const at::Tensor& like) {
  if (g.dim() == like.dim()) return g;
  const int64_t n = g.size(0);
  if (channels_last_only(like)) return g.reshape({n, like.size(2), like.size(3), like.size(1)}).permute({0, 3, 1, 2});
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape[0] = n;
  return g.reshape(shape);
}

// Each row of t times its entry of s ([rows] or [rows, 1]): execute.py's scale_rows.
at::Tensor scale_rows(const at::Tensor& t, const at::Tensor& s) {
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = -1;
  return t.mul(s.view(shape));
}

at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.dim() == 4 && like.is_contiguous(at::MemoryFormat::ChannelsLast) && !like.is_contiguous())
    return t.contiguous(at::MemoryFormat::ChannelsLast);
  return t.contiguous();
}

// A Python number in a binary op: torch wraps it as a 0-dim double tensor ("wrapped number"), whose kernel
// rounds differently from at::mul(Tensor, Scalar) in low precision; the executors must agree bit for bit.
at::Tensor python_number(double v) {
  at::Tensor t = at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble));
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

// execute.py's softplus_mean: ops/gan_losses.py's softplus with the same ATen ops, then the mean.
at::Tensor softplus_of(const at::Tensor& t) { return t.clamp_min(0) + t.abs().neg().exp().log1p(); }

at::ScalarType plan_dtype(int64_t code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kDouble;
    case 2: return at::kBFloat16;
    default: return at::kHalf;
  }
}

// b[j, i] = a[i, j] over an m x q tile (leading dimensions lda, ldb): ATen's vector transposes for fp32 and bf16
// (AVX2 and AVX-512 for fp32, AVX-512 for bf16; loops elsewhere), a loop for fp64.
template <typename T>
void transpose_tile(const T* a, int64_t lda, T* b, int64_t ldb, int m, int q) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (m == 16 && q == 16) return at::vec::transpose_mxn<T, 16, 16>(a, lda, b, ldb);
    return at::vec::transpose_mxn<T>(a, lda, b, ldb, m, q);
  } else {
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < q; ++j) b[j * ldb + i] = a[i * lda + j];
  }
}

// An image [N, C, H, W] in the other memory format (channels-last <-> channel-first): each sample's [H W, C] matrix
// transposed in 16 x 16 tiles. ATen's copy into a permuted layout ran at a tenth of a same-layout copy's speed
// here (docs/performance.md), and the conv preset's flatten and unflatten layers make eight such copies a step.
at::Tensor relayout(const at::Tensor& t, at::MemoryFormat to) {
  if (t.is_contiguous(to)) return t;  // as ATen's contiguous(to) (1 x 1 images, one channel: either layout)
  const bool to_last = to == at::MemoryFormat::ChannelsLast;
  const at::Tensor src = to_last ? t.contiguous() : t.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(to));
  const int64_t N = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  const int64_t R = to_last ? C : P, K = to_last ? P : C;  // each sample's source matrix is [R, K]
  if (t.numel() == 0) return out;
  VFN_DISPATCH(t.scalar_type(), "plan_step relayout", [&] {
    const scalar_t* const s_all = src.const_data_ptr<scalar_t>();
    scalar_t* const d_all = out.mutable_data_ptr<scalar_t>();
    for_tasks(N, [&](int64_t n) {
      const int64_t rows = R, cols = K;  // locals: see for_tasks
      const scalar_t* s = s_all + n * rows * cols;
      scalar_t* d = d_all + n * rows * cols;
      for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t k0 = 0; k0 < cols; k0 += 16) {
          const int m = static_cast<int>(std::min<int64_t>(16, rows - r0));
          const int q = static_cast<int>(std::min<int64_t>(16, cols - k0));
          transpose_tile(s + r0 * cols + k0, cols, d + k0 * rows + r0, rows, m, q);
        }
    });
  });
  return out;
}

// Channel-first rows [N, C H W] of an image in either memory format (the layout nn.Flatten's rows have).
at::Tensor flat_rows(const at::Tensor& t) {
  const at::Tensor c = t.is_contiguous() ? t : relayout(t, at::MemoryFormat::Contiguous);
  return c.view({t.size(0), -1});
}

// Rows [N, C H W] as a channels-last image [N, C, H, W] (the layout the conv layers read).
at::Tensor image_of_rows(const at::Tensor& rows, at::IntArrayRef chw) {
  return relayout(rows.contiguous().view({rows.size(0), chw[0], chw[1], chw[2]}), at::MemoryFormat::ChannelsLast);
}

// The native backend's layer_forward (vaegan_fast/ops/layer/native.py); flatten and unflatten give the same values
// in the layout their neighbour reads (channel-first rows, channels-last images).
at::Tensor layer_forward(Layer& l, const at::Tensor& x, int64_t groups, Cache& cache) {
  if (l.kind == kFlatten || l.kind == kUnflatten) {
    cache.x = x;
    if (l.kind == kFlatten) return flat_rows(x);
    return image_of_rows(x, l.out_shape);
  }
  if (l.kind == kDenseLayer && !l.norm) {
    auto [y, pre] = linear_act(x, *l.weight, l.bias, l.activation, l.slope);
    cache.x = x;
    cache.kept = keeps_preactivation(l.activation, l.slope) ? pre : y;
    return y;
  }
  auto [y, x_used, pre, kept, mean, rstd] =
      fused_layer_forward_keeping_windows(x, *l.weight, l.bias, l.norm_weight, l.norm_bias, l.running_mean,
                                          l.running_var, l.tracked, l.kind, l.stride, l.padding, l.output_padding,
                                          l.norm, true, l.momentum, l.eps, groups, l.activation, l.slope,
                                          &cache.windows);
  cache.x = x_used.numel() > 0 ? x_used : x;  // empty: x itself (fused_layer.cpp)
  cache.pre = pre;
  cache.kept = kept.numel() > 0 ? kept : y;  // empty: y
  cache.mean = mean;
  cache.rstd = rstd;
  return y;
}

// The native backend's layer_backward on rows [r0, r1) of the cache, dx on rows [d0, d1);
// {dx, dW, db, dgamma, dbeta}.
std::array<at::Tensor, 5> layer_backward(const Layer& l, const Cache& c, const at::Tensor& dy, int64_t r0,
                                         int64_t r1, int64_t d0, int64_t d1, int64_t groups, bool entry_pre_norm,
                                         bool need_dx, bool need_dw) {
  const int64_t rows = r1 - r0;
  if (l.kind == kFlatten) return {image_of_rows(dy.narrow(0, d0 - r0, d1 - d0), c.x.sizes().slice(1)), {}, {}, {}, {}};
  if (l.kind == kUnflatten) return {flat_rows(dy.narrow(0, d0 - r0, d1 - d0)), {}, {}, {}, {}};
  const bool whole = r0 == 0 && r1 == c.x.size(0);
  const at::Tensor x = whole ? c.x : c.x.narrow(0, r0, rows);
  if (l.kind == kDenseLayer && !l.norm) {
    TORCH_CHECK(d0 == r0 && d1 == r1, "vaegan_fast native plan_step: a dense layer without a norm forms its input "
                "gradient on the rows it runs on");
    const at::Tensor kept = whole ? c.kept : c.kept.narrow(0, r0, rows);
    auto [dx, dw, db] = linear_act_backward(dy, x, *l.weight, kept, !keeps_preactivation(l.activation, l.slope),
                                            l.activation, l.slope, {need_dx, need_dw, need_dw && l.has_bias});
    return {dx, dw, db, {}, {}};
  }
  const int64_t size = c.x.size(0) / groups, g0 = r0 / size, ng = rows / size;
  TORCH_CHECK(!l.norm || entry_pre_norm || (r0 % size == 0 && rows % size == 0 && ng >= 1),
              "vaegan_fast native plan_step: a backward through a norm must run on whole groups of ", size,
              " rows, got rows [", r0, ", ", r1, ")");
  std::optional<at::Tensor> pre, mean, rstd;
  if (c.pre.defined() && c.pre.numel() > 0) pre = c.pre.narrow(0, r0, rows);
  if (c.mean.defined() && c.mean.numel() > 0) {
    mean = c.mean.narrow(0, g0, ng);
    rstd = c.rstd.narrow(0, g0, ng);
  }
  at::Tensor windows;  // rows are sample-major: a sample's window rows are one block
  if (c.windows.defined() && need_dw) {
    const int64_t per_sample = c.windows.size(0) / c.x.size(0);
    windows = whole ? c.windows : c.windows.narrow(0, r0 * per_sample, rows * per_sample);
  }
  auto [dx, dw, db, dgamma, dbeta] = fused_layer_backward_with_windows(
      dy, x, *l.weight, l.has_bias, pre, c.kept.narrow(0, r0, rows), mean, rstd, l.norm_weight, l.kind, l.stride,
      l.padding, l.output_padding, l.norm, true, ng, l.activation, l.slope, entry_pre_norm, need_dx, need_dw, d0 - r0,
      d1 - d0, /*dy_writable=*/true, windows);
  return {dx, dw, db, dgamma, dbeta};
}

// execute.py's _backward: one stream, top layer down; returns the input gradient (undefined unless asked).
at::Tensor stream_backward(Network& net, const at::Tensor& seed, const at::Tensor& joined_seed,
                           const std::vector<int64_t>& ints, const std::vector<double>& floats) {
  const int64_t top = ints[1];
  const bool entry_pre_norm = ints[2], input_grad = ints[3], weight_grads = ints[4];
  int64_t g0 = ints[5], g1 = ints[6];
  const int64_t join_layer = ints[7], j0 = ints[8], j1 = ints[9], bottom = ints[10];
  const bool unit = ints[11];
  const int64_t s0 = g0;
  if (weight_grads && top + 1 == static_cast<int64_t>(net.layers.size())) {  // a stream from the top starts them
    net.grads.assign(net.layers.size(), {});
    net.has_grads = true;
  }
  // A unit stream (plan.py, the discriminator's "V"): a seed of ones, the weight gradients reading the output
  // gradients times the seed, per row.
  const at::Tensor scale = unit ? seed : at::Tensor();
  at::Tensor g = unit ? at::ones_like(seed) : seed;
  const Cache& top_cache = net.caches[top];
  at::Tensor like;
  if (entry_pre_norm) like = top_cache.pre;
  else if (top + 1 < static_cast<int64_t>(net.caches.size())) like = net.caches[top + 1].x;
  if (like.defined()) g = from_rows(g, like.narrow(0, g0, g1 - g0));
  for (int64_t i = top; i >= bottom; --i) {
    const int64_t r0 = ints[12 + 4 * i], r1 = ints[13 + 4 * i], d0 = ints[14 + 4 * i], d1 = ints[15 + 4 * i];
    if (r0 != g0 || r1 != g1) {  // the rows this layer runs on: the gradient's rows there, zeros elsewhere
      const int64_t lo = std::max(r0, g0), hi = std::min(r1, g1);
      if (lo == r0 && hi == r1) {
        g = g.narrow(0, r0 - g0, r1 - r0);
      } else {
        std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
        shape[0] = r1 - r0;
        at::Tensor wide = g.new_zeros(shape);
        if (lo < hi) wide.narrow(0, lo - r0, hi - lo).copy_(g.narrow(0, lo - g0, hi - lo));
        g = wide;
      }
    }
    if (i == join_layer) {  // the second seed enters at this layer's output (on the rows it runs on)
      const int64_t lo = std::max(r0, j0), hi = std::min(r1, j1);
      const at::Tensor joined = from_rows(joined_seed, net.caches[i + 1].x.narrow(0, j0, j1 - j0));
      if (lo < hi) g.narrow(0, lo - r0, hi - lo).add_(joined.narrow(0, lo - j0, hi - lo), floats[0]);
    }
    const Layer& l = net.layers[i];
    const bool need_dx = d0 >= 0;
    std::array<at::Tensor, 5> out;
    if (unit) {  // no layer here couples rows: the input gradient on its own rows, the weight gradients apart
      const at::Tensor dy_w = l.kind <= kConvTLayer ? scale_rows(g, scale.narrow(0, r0 - s0, r1 - r0)) : at::Tensor();
      if (need_dx) out[0] = layer_backward(l, net.caches[i], g.narrow(0, d0 - r0, d1 - d0), d0, d1, d0, d1,
                                           net.groups, false, true, false)[0];
      if (dy_w.defined()) {
        auto w = layer_backward(l, net.caches[i], dy_w, r0, r1, r0, r1, net.groups, false, false, true);
        out[1] = w[1], out[2] = w[2], out[3] = w[3], out[4] = w[4];
      }
    } else {
      out = layer_backward(l, net.caches[i], g, r0, r1, need_dx ? d0 : r0, need_dx ? d1 : r1, net.groups,
                           entry_pre_norm && i == top, need_dx, weight_grads);
    }
    if (weight_grads && l.kind <= kConvTLayer) net.grads[i] = {out[1], out[2], out[3], out[4]};
    g = out[0];
    g0 = d0;
    g1 = d1;
  }
  return input_grad ? g : at::Tensor();
}

// The weight gradients in the parameters' own dtype (a bf16 step's go to its fp32 master weights) when
// master_grads, else as the step formed them (a bf16 step's in bf16, for an optimizer that widens them as it reads).
std::vector<at::Tensor> param_grads(const Network& net, bool master_grads) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < net.layers.size(); ++i) {
    const Layer& l = net.layers[i];
    if (l.kind > kConvTLayer) continue;
    auto add = [&](const at::Tensor& g) {
      out.push_back(master_grads && g.defined() && g.scalar_type() != l.param_dtype ? g.to(l.param_dtype) : g);
    };
    add(net.grads[i][0]);
    if (l.has_bias) add(net.grads[i][1]);
    if (l.norm) {
      add(net.grads[i][2]);
      add(net.grads[i][3]);
    }
  }
  return out;
}

std::optional<at::Tensor> optional_of(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  std::optional<at::Tensor> t = list.get(i);
  return t.has_value() && t->defined() ? t : std::nullopt;
}

}  // namespace

std::vector<at::Tensor> plan_step(const c10::List<std::optional<at::Tensor>>& inputs, at::IntArrayRef program,
                                  at::ArrayRef<double> program_floats,
                                  const c10::List<std::optional<at::Tensor>>& layer_tensors,
                                  at::IntArrayRef layer_table, at::ArrayRef<double> layer_floats,
                                  at::IntArrayRef networks, at::IntArrayRef outputs, int64_t n_slots,
                                  bool master_grads) {
  // ---- the networks: the parameters in the step's dtype (x's), the running averages as they are
  auto x_in = optional_of(inputs, 0);
  TORCH_CHECK(x_in.has_value(), "vaegan_fast native plan_step: the first input is the batch x");
  const at::ScalarType compute = x_in->scalar_type();
  std::array<Network, 3> nets;
  size_t ti = 0, fi = 0, ti_tensor = 0;
  for (auto& net : nets) {
    TORCH_CHECK(ti < layer_table.size(), "vaegan_fast native plan_step: the layer table is too short");
    const int64_t n = layer_table[ti++];
    for (int64_t k = 0; k < n; ++k) {
      Layer l;
      l.kind = layer_table[ti++];
      l.has_bias = layer_table[ti++];
      l.norm = layer_table[ti++];
      l.activation = layer_table[ti++];
      l.stride = {layer_table[ti], layer_table[ti + 1]};
      l.padding = {layer_table[ti + 2], layer_table[ti + 3]};
      l.output_padding = {layer_table[ti + 4], layer_table[ti + 5]};
      ti += 6;
      const int64_t dims = layer_table[ti++];
      l.out_shape.assign(layer_table.begin() + ti, layer_table.begin() + ti + dims);
      ti += dims;
      l.slope = layer_floats[fi];
      l.eps = layer_floats[fi + 1];
      l.momentum = layer_floats[fi + 2];
      fi += 3;
      std::optional<at::Tensor>* slots[7] = {&l.weight, &l.bias, &l.norm_weight, &l.norm_bias, &l.running_mean,
                                             &l.running_var, &l.tracked};
      for (auto* s : slots) *s = optional_of(layer_tensors, ti_tensor++);
      if (l.weight) l.param_dtype = l.weight->scalar_type();
      for (auto* s : {&l.weight, &l.bias, &l.norm_weight, &l.norm_bias})
        if (s->has_value() && (*s)->scalar_type() != compute) *s = (*s)->to(compute);
      net.layers.push_back(std::move(l));
    }
  }
  // ---- the program
  std::vector<at::Tensor> slot(n_slots);
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto t = optional_of(inputs, i);
    if (t) slot[i] = *t;
  }
  size_t pc = 0, pf = 0;
  std::vector<int64_t> ins, outs, ints;
  std::vector<double> floats;
  while (pc < program.size()) {
    const int64_t op = program[pc++];
    auto take = [&](std::vector<int64_t>& v) {
      const int64_t count = program[pc++];
      v.assign(program.begin() + pc, program.begin() + pc + count);
      pc += count;
    };
    take(ins);
    take(outs);
    take(ints);
    const int64_t nf = program[pc++];
    floats.assign(program_floats.begin() + pf, program_floats.begin() + pf + nf);
    pf += nf;
    auto in = [&](size_t k) -> const at::Tensor& { return slot[ins[k]]; };
    std::vector<at::Tensor> out;
    // One profiler range per instruction (free when no profiler runs): bench/profile_step.py reads them.
    static const char* const kNames[] = {"plan::forward", "plan::split", "plan::clamp", "plan::reparam", "plan::cat",
                                         "plan::image_head", "plan::rows", "plan::feature_recon", "plan::u_seed",
                                         "plan::softplus", "plan::softplus_mean", "plan::mean", "plan::combine",
                                         "plan::backward", "plan::image_head_backward", "plan::sigmoid_backward",
                                         "plan::pixel_grad", "plan::reparam_backward", "plan::clamp_backward",
                                         "plan::cat_cols", "plan::scale", "plan::cast", "plan::view_rows",
                                         "plan::scale_rows"};
    RECORD_FUNCTION(kNames[op], std::vector<c10::IValue>());
    switch (op) {
      case kForward: {
        Network& net = nets[ints[0]];
        net.groups = ints[1];
        net.caches.assign(net.layers.size(), {});
        at::Tensor h = in(0), tapped;
        for (size_t i = 0; i < net.layers.size(); ++i) {
          h = layer_forward(net.layers[i], h, net.groups, net.caches[i]);
          if (static_cast<int64_t>(i) == ints[2]) tapped = ints[3] == 0 ? h : net.caches[i].pre;
        }
        out = {h};
        if (ints[2] >= 0) out.push_back(tapped);
        break;
      }
      case kSplit: {
        const at::Tensor& t = in(0);
        out = {t.narrow(1, 0, ints[0]), t.narrow(1, ints[0], t.size(1) - ints[0])};
        break;
      }
      case kClamp: out = {in(0).clamp(floats[0], floats[1])}; break;
      case kReparam: {
        auto [z, kl] = reparam_kl(in(0), in(1), in(2));
        out = {z, kl};
        break;
      }
      case kCat: {
        std::vector<at::Tensor> parts;
        for (size_t k = 0; k < ins.size(); ++k) parts.push_back(in(k));
        out = {at::cat(parts)};
        break;
      }
      case kImageHead: {
        const at::Tensor &logits = in(0), &x = in(1);
        const bool with_real = ints[0], with_pixel = ints[1];
        const int64_t batch = x.size(0), rows = logits.size(0) + (with_real ? batch : 0);
        std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
        shape[0] = rows;
        const auto fmt = logits.dim() == 4 && !logits.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous;
        at::Tensor buffer = at::empty(shape, logits.options().memory_format(fmt));
        if (with_real) buffer.narrow(0, 0, batch).copy_(x);
        at::Tensor images = with_real ? buffer.narrow(0, batch, rows - batch) : buffer;
        at::Tensor pixel = image_head_forward(logits, like_layout(x, logits), images, with_pixel);
        out = {buffer, images, pixel};
        break;
      }
      case kRows: out = {in(0).narrow(0, ints[0], ints[1] - ints[0])}; break;
      case kFeatureRecon: {
        auto [loss, grad] = feature_recon(in(0), in(1), true);
        out = {loss, grad};
        break;
      }
      case kUSeed: {
        const at::Tensor& g = in(0);
        out = {ints[0] ? at::cat({g, at::zeros_like(g), g.neg()}) : g.neg()};
        break;
      }
      case kSoftplus: {
        const size_t n = ins.size();
        std::vector<at::Tensor> xs;
        for (size_t k = 0; k < n; ++k) xs.push_back(in(k));
        auto terms = softplus_losses(xs, at::ArrayRef<double>(floats).slice(0, n),
                                     at::ArrayRef<double>(floats).slice(n, n), true);
        out = {terms[0], terms.size() > 2 ? at::cat(at::TensorList(terms).slice(1)) : terms[1]};
        break;
      }
      case kSoftplusMean: out = {softplus_of(floats[0] > 0 ? in(0) : in(0).neg()).mean()}; break;
      case kMean: out = {in(0).mean()}; break;
      case kCombine: {
        at::Tensor acc;
        for (size_t k = 0; k < ins.size(); ++k) {
          at::Tensor term = floats[k] == 1.0 ? in(k) : in(k).mul(python_number(floats[k]));
          acc = acc.defined() ? acc.add(term) : term;
        }
        out = {acc};
        break;
      }
      case kViewRows: out = {rows_view(in(0))}; break;
      case kBackward:
        out = {stream_backward(nets[ints[0]], in(0), ins.size() > 1 ? in(1) : at::Tensor(), ints, floats)};
        break;
      case kImageHeadBackward: {
        TORCH_CHECK(!ints[2], "vaegan_fast native plan_step: a loss scale is not for the native backend");
        const at::Tensor& images = in(0);
        auto [dec_up, enc_up] = image_head_backward(images, like_layout(in(1), images), like_layout(in(2), images),
                                                    like_layout(in(3), images), floats[0], floats[1], ints[0],
                                                    ints[1]);
        out = {dec_up, enc_up};
        break;
      }
      case kSigmoidBackward: out = {at::sigmoid_backward(like_layout(in(1), in(0)), in(0))}; break;
      case kPixelGrad: out = {at::sub(in(0), like_layout(in(1), in(0))).mul_(python_number(floats[0]))}; break;
      case kReparamBackward: {
        TORCH_CHECK(!ints[0], "vaegan_fast native plan_step: a loss scale is not for the native backend");
        at::Tensor grad_kl = at::full_like(in(4), floats[0]);
        auto [d_mu, d_logvar, unused] = reparam_kl_backward(in(0), in(1), in(2), rows_view(in(3)), grad_kl, false);
        out = {d_mu, d_logvar};
        break;
      }
      case kClampBackward:
        out = {in(0).mul(in(1).ge(floats[0]).bitwise_and(in(1).le(floats[1])))};
        break;
      case kCatCols: out = {at::cat({in(0), in(1)}, 1)}; break;
      case kScale: out = {in(0).mul(in(1))}; break;
      case kCast: out = {in(0).to(plan_dtype(ints[0]))}; break;
      case kScaleRows: out = {scale_rows(in(0), in(1))}; break;
      default: TORCH_CHECK(false, "vaegan_fast native plan_step: unknown op ", op);
    }
    for (size_t k = 0; k < outs.size() && k < out.size(); ++k) slot[outs[k]] = out[k];
  }
  std::vector<at::Tensor> result;
  for (int64_t net : networks) {
    auto grads = param_grads(nets[net], master_grads);
    result.insert(result.end(), grads.begin(), grads.end());
  }
  for (int64_t s : outputs) result.push_back(slot[s]);
  return result;
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) { m.impl("plan_step", &plan_step); }

}  // namespace vaegan_fast_native
