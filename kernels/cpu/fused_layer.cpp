// The fused layer on the CPU (vaegan_fast/ops/layer/reference.py is its specification): a product, its bias, an
// optional batch norm and an activation.
//
//   forward   a = product(x) + bias        dense: product_mm / product_addmm (common.h); conv2d and
//                                           conv_transpose2d: at::convolution on channels-last tensors
//                                           (oneDNN), the bias added inside it
//             norm (training)               per group g of rows and channel c of the [M, C] matrix a (M = N H W:
//                                           channels-last memory is that matrix): mean and biased variance in
//                                           two passes; the running averages updated as nn.BatchNorm does
//             y = act(a * k + s)            one pass: k = gamma rstd, s = beta - mean k per (g, c); without a
//                                           norm, y = act(a) in place (none for the identity)
//   backward  dh = dy * act'(kept)          never written out:
//             norm (training)               pass 1: s1 = sum dh, s2 = sum dh (a - mean) per (g, c) (-> dbeta,
//                                           dgamma = s2 rstd); pass 2: da = k dh + k2 a + k3 with
//                                           k2 = -k rstd^2 s2 / m, k3 = k (rstd^2 s2 mean - s1) / m
//             norm (eval)                   da = dh k, and s1, s2 for the affine parameters, in one pass
//             dx, dW, db                    dense: product_mm (and the column sums of da); conv:
//                                           at::convolution_backward (oneDNN)
//
// Bytes moved besides the products, n = M C values of size e: forward with a norm reads a three times and
// writes y (4 n e; + n e when the pre-activation is kept); backward reads dy, kept and a twice and writes da
// (7 n e). Eager PyTorch: batch_norm (3 reads, 1 write), the activation (1 read, 1 write), and in backward the
// activation's derivative (2 reads, 1 write) then batch_norm_backward (3 reads of dh and a, 1 write).
//
// bf16: the products run in the dtype common.h's product_dtype picks (bf16 on CPUs with bf16 units: oneDNN,
// fp32 accumulation; else fp32 on upcast operands), except the column-path convolutions, always in fp32
// (layer_product_dtype); a is rounded to bf16 once; the norm and its statistics compute in fp32.
// Sums: fixed tasks of rows within one group, a partial per task,
// partials added in task order in double: the same bits with any thread count.
#include "activation.h"
#include "common.h"
#include "ops.h"

#include <ATen/record_function.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>

#include <cstring>
#include <utility>

namespace vaegan_fast_native {
namespace {

enum Kind : int64_t { kDense = 0, kConv = 1, kConvTranspose = 2 };

// Rows per task of a [rows, C] pass: about kTask values (fixed: the results do not depend on the threads).
int64_t rows_per_task(int64_t C) { return std::max<int64_t>(1, kTask / std::max<int64_t>(C, 1)); }

// Per-(group, channel) sums of f(row pointer, chunk) over the rows of each group, in double: the tasks are row
// blocks inside one group, each task's partial in its own slot, the slots added in task order.
template <typename T, typename F>
std::vector<double> group_channel_sums(int64_t M, int64_t C, int64_t G, int64_t width, const F& f) {
  using A = acc_t<T>;
  const int64_t Mg = M / G, R = rows_per_task(C), per_group = ceil_div(Mg, R);
  std::vector<A> partials(G * per_group * width * C, A(0));
  for_tasks(G * per_group, [&](int64_t task) {
    const int64_t g = task / per_group, r0 = g * Mg + (task % per_group) * R;
    const int64_t r1 = std::min(g * Mg + Mg, r0 + R);
    A* const out = partials.data() + task * width * C;
    for (int64_t r = r0; r < r1; ++r) f(r, g, out);
  });
  std::vector<double> sums(G * width * C, 0.0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < per_group; ++t) {
      const A* p = partials.data() + (g * per_group + t) * width * C;
      for (int64_t j = 0; j < width * C; ++j) sums[g * width * C + j] += static_cast<double>(p[j]);
    }
  return sums;
}

// chunk += src over the channels of one row (register chunks, common.h).
template <typename T, typename Load>
inline void accumulate_row(acc_t<T>* acc, int64_t C, const Load& load) {
  using A = acc_t<T>;
  for_chunks<T>(0, C, [&](int64_t j, int64_t m) {
    Chunk<A> s;
    s.load(acc + j, m);
    Chunk<T> v = load(j, m);
    for (int k = 0; k < Chunk<T>::kVecs; ++k) s.v[k] = s.v[k] + v.v[k];
    s.store(acc + j, m);
  });
}

// mean and biased variance per (group, channel), two passes over a.
template <typename T>
void batch_stats(const T* a, int64_t M, int64_t C, int64_t G, std::vector<double>& mean, std::vector<double>& var) {
  using A = acc_t<T>;
  const double count = double(M / G);
  auto sums = group_channel_sums<T>(M, C, G, 1, [&](int64_t r, int64_t, A* out) {
    const T* row = a + r * C;
    accumulate_row<T>(out, C, [&](int64_t j, int64_t m) { Chunk<T> c; c.load(row + j, m); return c; });
  });
  mean.assign(G * C, 0.0);
  for (int64_t i = 0; i < G * C; ++i) mean[i] = sums[i] / count;
  std::vector<A> mean_acc(mean.begin(), mean.end());
  auto sq = group_channel_sums<T>(M, C, G, 1, [&](int64_t r, int64_t g, A* out) {
    const T* row = a + r * C;
    const A* mu = mean_acc.data() + g * C;
    accumulate_row<T>(out, C, [&](int64_t j, int64_t m) {
      Chunk<T> c;
      c.load(row + j, m);
      Chunk<A> mc;
      mc.load(mu + j, m);
      for (int k = 0; k < Chunk<T>::kVecs; ++k) {
        const auto d = c.v[k] - mc.v[k];
        c.v[k] = d * d;
      }
      return c;
    });
  });
  var.assign(G * C, 0.0);
  for (int64_t i = 0; i < G * C; ++i) var[i] = sq[i] / count;
}

// y = act(a * k + s) per (group, channel); h (the pre-activation) too when it is kept.
template <int64_t Act, typename T>
void affine_act_kernel(const T* a, T* y, T* h, const acc_t<T>* k, const acc_t<T>* s, int64_t M, int64_t C, int64_t G,
                       acc_t<T> slope) {
  using A = acc_t<T>;
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  const int64_t Mg = M / G, R = rows_per_task(C);
  for_tasks(ceil_div(M, R), [&](int64_t task) {
    const T* const a_ = a;  // locals, not captures: see for_tasks
    T* const y_ = y;
    T* const h_ = h;
    const int64_t cols = C, group_rows = Mg, r1 = std::min(M, (task + 1) * R);
    const V slope_(slope);
    for (int64_t r = task * R; r < r1; ++r) {
      const A* kg = k + (r / group_rows) * cols;
      const A* sg = s + (r / group_rows) * cols;
      for_chunks<T>(0, cols, [&](int64_t j, int64_t m) {
        Ch c;
        c.load(a_ + r * cols + j, m);
        Chunk<A> ck, cs;
        ck.load(kg + j, m);
        cs.load(sg + j, m);
        for (int q = 0; q < Ch::kVecs; ++q) c.v[q] = at::vec::fmadd(c.v[q], ck.v[q], cs.v[q]);
        if (h_) c.store(h_ + r * cols + j, m);
        for (int q = 0; q < Ch::kVecs; ++q) c.v[q] = activate<Act>(c.v[q], slope_);
        c.store(y_ + r * cols + j, m);
      });
    }
  });
}

// In place: y = act(y + bias), h keeping the pre-activation when asked (no norm; a null bias: none, or already
// added by the product).
template <int64_t Act, typename T>
void act_in_place(T* y, T* h, const acc_t<T>* bias, int64_t M, int64_t C, acc_t<T> slope) {
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  const int64_t R = rows_per_task(C);
  for_tasks(ceil_div(M, R), [&](int64_t task) {
    T* const y_ = y;
    T* const h_ = h;
    const acc_t<T>* const bias_ = bias;
    const int64_t cols = C, r1 = std::min(M, (task + 1) * R);
    const V slope_(slope);
    for (int64_t r = task * R; r < r1; ++r)
      for_chunks<T>(0, cols, [&](int64_t j, int64_t m) {
        Ch c;
        c.load(y_ + r * cols + j, m);
        if (bias_) {
          Chunk<acc_t<T>> cb;
          cb.load(bias_ + j, m);
          for (int q = 0; q < Ch::kVecs; ++q) c.v[q] = c.v[q] + cb.v[q];
        }
        if (h_) c.store(h_ + r * cols + j, m);
        for (int q = 0; q < Ch::kVecs; ++q) c.v[q] = activate<Act>(c.v[q], slope_);
        c.store(y_ + r * cols + j, m);
      });
  });
}

// dh = dy * act'(kept) for one chunk of row r at channel j.
template <int64_t Act, typename T>
inline Chunk<T> grad_pre_act(const T* dy, const T* kept, int64_t off, int64_t m,
                             const typename Chunk<T>::V& slope) {
  Chunk<T> g;
  g.load(dy + off, m);
  if constexpr (Act != kIdentity) {
    Chunk<T> s;
    s.load(kept + off, m);
    for (int q = 0; q < Chunk<T>::kVecs; ++q) g.v[q] = derivative<Act>(g.v[q], s.v[q], slope);
  }
  return g;
}

// out[r] = dh * k + a * k2 + k3 per (group, channel) (k2 = k3 = 0 for eval mode: da = dh k).
template <int64_t Act, typename T>
void norm_backward_apply(const T* dy, const T* kept, const T* a, T* da, const acc_t<T>* k, const acc_t<T>* k2,
                         const acc_t<T>* k3, int64_t M, int64_t C, int64_t G, acc_t<T> slope) {
  using A = acc_t<T>;
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  const int64_t Mg = M / G, R = rows_per_task(C);
  for_tasks(ceil_div(M, R), [&](int64_t task) {
    const T* const dy_ = dy;
    const T* const kept_ = kept;
    const T* const a_ = a;
    T* const da_ = da;
    const int64_t cols = C, group_rows = Mg, r1 = std::min(M, (task + 1) * R);
    const V slope_(slope);
    for (int64_t r = task * R; r < r1; ++r) {
      const int64_t g = r / group_rows;
      for_chunks<T>(0, cols, [&](int64_t j, int64_t m) {
        const int64_t off = r * cols + j;
        Ch h = grad_pre_act<Act, T>(dy_, kept_, off, m, slope_);
        Chunk<A> ck;
        ck.load(k + g * cols + j, m);
        if (k2) {
          Ch av;
          av.load(a_ + off, m);
          Chunk<A> ck2, ck3;
          ck2.load(k2 + g * cols + j, m);
          ck3.load(k3 + g * cols + j, m);
          for (int q = 0; q < Ch::kVecs; ++q)
            h.v[q] = at::vec::fmadd(h.v[q], ck.v[q], at::vec::fmadd(av.v[q], ck2.v[q], ck3.v[q]));
        } else {
          for (int q = 0; q < Ch::kVecs; ++q) h.v[q] = h.v[q] * ck.v[q];
        }
        h.store(da_ + off, m);
      });
    }
  });
}

// da = dy * act'(kept) written out (no norm), or nothing for the identity.
template <int64_t Act, typename T>
void act_backward(const T* dy, const T* kept, T* da, int64_t M, int64_t C, acc_t<T> slope) {
  using Ch = Chunk<T>;
  using V = typename Ch::V;
  const int64_t R = rows_per_task(C);
  for_tasks(ceil_div(M, R), [&](int64_t task) {
    const T* const dy_ = dy;
    const T* const kept_ = kept;
    T* const da_ = da;
    const int64_t cols = C, r1 = std::min(M, (task + 1) * R);
    const V slope_(slope);
    for (int64_t r = task * R; r < r1; ++r)
      for_chunks<T>(0, cols, [&](int64_t j, int64_t m) {
        grad_pre_act<Act, T>(dy_, kept_, r * cols + j, m, slope_).store(da_ + r * cols + j, m);
      });
  });
}

// The [M, C] row-major memory of a dense output or a channels-last conv output (a copy only if it is neither).
at::Tensor rows_layout(const at::Tensor& t) {
  if (t.dim() == 2) return t.contiguous();
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

int64_t matrix_rows(const at::Tensor& t) { return t.numel() / t.size(1); }


// ---- convolutions with few channels on one side, as column GEMMs ---------------------------------------
// oneDNN runs a convolution whose input (conv2d) or output (conv_transpose2d) has one to a few channels at
// a small fraction of its usual rate (measured: docs/performance.md), and returns such images in a layout
// that costs a transposing copy. There the product is one GEMM over window rows (gathered below, or scattered
// by its adjoint) whose output rows are the channels-last matrix itself.
constexpr int64_t kColumnChannels = 4;

bool column_path(int64_t kind, const at::Tensor& weight) {
  if (kind == kConv) return weight.size(1) <= kColumnChannels;  // few input channels
  if (kind == kConvTranspose) return weight.size(1) <= kColumnChannels;  // few output channels
  return false;
}

// The dtype the layer's product runs in (common.h's product_dtype), except that a column-path product keeps
// bf16 operands upcast on either path: those products are small and bound by their bytes (kh kw window values
// per few channels), not their multiply-adds, and the window rows are gathered and scattered in fp32.
at::ScalarType layer_product_dtype(at::ScalarType dtype, int64_t kind, const at::Tensor& weight) {
  if (dtype == at::kBFloat16 && column_path(kind, weight)) return at::kFloat;
  return product_dtype(dtype);
}

// ---- window rows: the column path's gather and its adjoint ----------------------------------------------
// A window grid [OH, OW] over a channels-last image [N, H, W, C]: grid point (oh, ow) reads the kh x kw pixels at
// (oh sh - ph + i, ow sw - pw + j). Its row of the [N OH OW, kh kw C] matrix holds them in (i, j, c) order, so a
// window row's kw C values at one i are one contiguous run of the image when the window lies inside it. A
// convolution's rows are its output pixels; a transposed convolution's are its input pixels (the pixels that
// input pixel's kernel reaches in the output). One task per sample; the adjoint sums each pixel's entries in a
// fixed order: the same bits with any thread count. Column-path products run in fp32 or fp64 on either bf16
// path (layer_product_dtype), so these sum in their own dtype.
struct Windows {
  int64_t N, H, W, C, OH, OW, kh, kw, sh, sw, ph, pw;
  int64_t width() const { return kh * kw * C; }
};

Windows windows_of(const at::Tensor& image, int64_t oh, int64_t ow, at::IntArrayRef kernel, at::IntArrayRef stride,
                   at::IntArrayRef padding) {
  return {image.size(0), image.size(2), image.size(3), image.size(1), oh, ow, kernel[0], kernel[1],
          stride[0],     stride[1],     padding[0],    padding[1]};
}

// dst[0, n) = src[0, n) (zeros for a null src), and dst[0, n) += src[0, n). A window's run is a few values
// (kw C), where a memcpy call of runtime length, a scalar loop or a masked vector op each cost more than the
// values they move (docs/performance.md): runs of up to kSmallRun values go through code of their exact length.
constexpr int64_t kSmallRun = 16;

template <typename T, int64_t N>
inline void copy_exact(T* dst, const T* src) {
  if (src) std::memcpy(dst, src, N * sizeof(T));
  else std::memset(dst, 0, N * sizeof(T));
}
template <typename T, int64_t N>
inline void add_exact(T* dst, const T* src) {
  for (int64_t k = 0; k < N; ++k) dst[k] += src[k];
}
template <typename T, int64_t... Ns>
inline void copy_run(T* dst, const T* src, int64_t n, std::integer_sequence<int64_t, Ns...>) {
  if (((n == Ns + 1 && (copy_exact<T, Ns + 1>(dst, src), true)) || ...)) return;
  if (src) std::memcpy(dst, src, n * sizeof(T));
  else std::memset(dst, 0, n * sizeof(T));
}
template <typename T, int64_t... Ns>
inline void add_run(T* dst, const T* src, int64_t n, std::integer_sequence<int64_t, Ns...>) {
  if (((n == Ns + 1 && (add_exact<T, Ns + 1>(dst, src), true)) || ...)) return;
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}
template <typename T>
inline void copy_run(T* dst, const T* src, int64_t n) {
  copy_run(dst, src, n, std::make_integer_sequence<int64_t, kSmallRun>());
}
template <typename T>
inline void add_run(T* dst, const T* src, int64_t n) {
  add_run(dst, src, n, std::make_integer_sequence<int64_t, kSmallRun>());
}

template <typename T>
void windows_gather_kernel(const T* image, T* rows, const Windows g) {
  for_tasks(g.N, [&](int64_t n) {
    const Windows d = g;  // locals: see for_tasks on captured variables
    const int64_t run = d.kw * d.C, width = d.width();
    const T* src = image + n * d.H * d.W * d.C;
    T* out = rows + n * d.OH * d.OW * width;
    for (int64_t oh = 0; oh < d.OH; ++oh)
      for (int64_t ow = 0; ow < d.OW; ++ow, out += width)
        for (int64_t i = 0; i < d.kh; ++i) {
          const int64_t h = oh * d.sh - d.ph + i, w0 = ow * d.sw - d.pw;
          T* o = out + i * run;
          if (h < 0 || h >= d.H) {
            copy_run<T>(o, nullptr, run);
          } else if (w0 >= 0 && w0 + d.kw <= d.W) {
            copy_run(o, src + (h * d.W + w0) * d.C, run);
          } else {
            for (int64_t j = 0; j < d.kw; ++j, o += d.C) {
              const int64_t w = w0 + j;
              copy_run<T>(o, w < 0 || w >= d.W ? nullptr : src + (h * d.W + w) * d.C, d.C);
            }
          }
        }
  });
}

// Each pixel's entries are added in (oh, ow, i) order, one run per window row: the same order as one entry at a
// time, so the same bits.
template <typename T>
void windows_scatter_kernel(const T* rows, T* image, const T* bias, const Windows g) {
  for_tasks(g.N, [&](int64_t n) {
    const Windows d = g;
    const int64_t run = d.kw * d.C, width = d.width(), pixels = d.H * d.W * d.C;
    T* const out = image + n * pixels;
    if (bias) {  // each pixel starts at its channel's bias (a transposed convolution's forward)
      for (int64_t k = 0; k < pixels; k += d.C) copy_run(out + k, bias, d.C);
    } else {
      std::memset(out, 0, pixels * sizeof(T));
    }
    const T* in = rows + n * d.OH * d.OW * width;
    for (int64_t oh = 0; oh < d.OH; ++oh)
      for (int64_t ow = 0; ow < d.OW; ++ow, in += width)
        for (int64_t i = 0; i < d.kh; ++i) {
          const int64_t h = oh * d.sh - d.ph + i, w0 = ow * d.sw - d.pw;
          if (h < 0 || h >= d.H) continue;
          if (w0 >= 0 && w0 + d.kw <= d.W) {
            add_run(out + (h * d.W + w0) * d.C, in + i * run, run);
            continue;
          }
          for (int64_t j = 0; j < d.kw; ++j) {
            const int64_t w = w0 + j;
            if (w >= 0 && w < d.W) add_run(out + (h * d.W + w) * d.C, in + (i * d.kw + j) * d.C, d.C);
          }
        }
  });
}

// The [N OH OW, kh kw C] window rows of a channels-last image.
at::Tensor windows_gather(const at::Tensor& image_, const Windows& g) {
  RECORD_FUNCTION("fused_layer::windows_gather", std::vector<c10::IValue>());
  const at::Tensor image = image_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor rows = at::empty({g.N * g.OH * g.OW, g.width()}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "fused_layer column path", [&] {  // fp32 or fp64: see above
    windows_gather_kernel<scalar_t>(image.const_data_ptr<scalar_t>(), rows.mutable_data_ptr<scalar_t>(), g);
  });
  return rows;
}

// The adjoint: each pixel of the channels-last [N, C, H, W] image the sum of the window-row entries that read it.
// With a bias (a transposed convolution's forward) each pixel's sum starts at its channel's bias.
at::Tensor windows_scatter(const at::Tensor& rows_, const Windows& g,
                           const std::optional<at::Tensor>& bias = std::nullopt) {
  RECORD_FUNCTION("fused_layer::windows_scatter", std::vector<c10::IValue>());
  const at::Tensor rows = rows_.contiguous();
  at::Tensor image = at::empty({g.N, g.C, g.H, g.W}, rows.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "fused_layer column path", [&] {
    const at::Tensor b = bias ? bias->to(rows.scalar_type()).contiguous() : at::Tensor();
    windows_scatter_kernel<scalar_t>(rows.const_data_ptr<scalar_t>(), image.mutable_data_ptr<scalar_t>(),
                                     b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, g);
  });
  return image;
}

// A conv weight [O, I, kh, kw] as the [O, kh kw I] matrix of window rows (conv2d: O = Cout over rows of the
// input's windows; conv_transpose2d: O = Cin, I = Cout, rows of the output's windows), and back.
at::Tensor weight_as_rows(const at::Tensor& weight) {
  return weight.permute({0, 2, 3, 1}).reshape({weight.size(0), -1});
}
at::Tensor rows_as_weight(const at::Tensor& m, at::IntArrayRef sizes) {
  return m.view({sizes[0], sizes[2], sizes[3], sizes[1]}).permute({0, 3, 1, 2}).contiguous();
}

// [N, C, H, W] channels-last as its [N H W, C] matrix (a view), and back.
at::Tensor image_rows(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
}
at::Tensor rows_as_image(const at::Tensor& rows, int64_t n, int64_t oh, int64_t ow) {
  return rows.view({n, oh, ow, rows.size(1)}).permute({0, 3, 1, 2});
}

// windows_out: where a column-path conv2d leaves its window rows of x (for its weight gradient), when not null.
at::Tensor product(int64_t kind, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                   at::Tensor* windows_out) {
  if (kind == kDense) return bias ? product_addmm(*bias, x, weight.t()) : product_mm(x, weight.t());
  if (column_path(kind, weight)) {
    const int64_t n = x.size(0), kh = weight.size(2), kw = weight.size(3);
    if (kind == kConv) {  // output rows = window rows of x times the weight's rows
      const int64_t oh = (x.size(2) + 2 * padding[0] - kh) / stride[0] + 1;
      const int64_t ow = (x.size(3) + 2 * padding[1] - kw) / stride[1] + 1;
      const at::Tensor rows = windows_gather(x, windows_of(x, oh, ow, {kh, kw}, stride, padding));
      if (windows_out) *windows_out = rows;
      const at::Tensor w = weight_as_rows(weight).t();  // [kh kw Cin, Cout]
      return rows_as_image(bias ? product_addmm(*bias, rows, w) : product_mm(rows, w), n, oh, ow);
    }
    // conv_transpose2d: each input pixel's row times the weight's rows gives its output window, scattered
    const int64_t oh = (x.size(2) - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0];
    const int64_t ow = (x.size(3) - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1];
    const at::Tensor windows = product_mm(image_rows(x), weight_as_rows(weight));  // [N H W, kh kw Cout]
    Windows g{n, oh, ow, weight.size(1), x.size(2), x.size(3), kh, kw, stride[0], stride[1], padding[0], padding[1]};
    return windows_scatter(windows, g, bias);
  }
  return at::convolution(x, weight, bias, stride, padding, {1, 1}, kind == kConvTranspose, output_padding, 1);
}

// {dx, dW, db} of a column-path product from da (the product's output gradient, channels-last).
// windows: a conv2d's window rows of x from its forward (undefined: gathered here).
std::tuple<at::Tensor, at::Tensor, at::Tensor> column_backward(int64_t kind, const at::Tensor& da, const at::Tensor& x,
                                                               const at::Tensor& weight, at::IntArrayRef stride,
                                                               at::IntArrayRef padding, bool need_dx, bool need_dw,
                                                               bool need_db, const at::Tensor& windows) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const at::Tensor w = weight_as_rows(weight);
  at::Tensor dx, dw, db;
  const at::Tensor da_rows = image_rows(da);
  if (kind == kConv) {  // out = rows(x) W^T: dW = da^T rows(x), dx = scatter(da W)
    const Windows g = windows_of(x, da.size(2), da.size(3), {kh, kw}, stride, padding);
    if (need_dw)
      dw = rows_as_weight(product_mm(da_rows.t(), windows.defined() ? windows : windows_gather(x, g)),
                          weight.sizes());
    if (need_dx) dx = windows_scatter(product_mm(da_rows, w), g);
  } else {  // windows(y) = x_rows W: dx = rows(da) W^T, dW = x_rows^T rows(da)
    const Windows g = windows_of(da, x.size(2), x.size(3), {kh, kw}, stride, padding);
    const at::Tensor rows = windows_gather(da, g);  // [N H W, kh kw Cout]
    if (need_dw) dw = rows_as_weight(product_mm(image_rows(x).t(), rows), weight.sizes());
    if (need_dx) dx = rows_as_image(product_mm(rows, w.t()), x.size(0), x.size(2), x.size(3));
  }
  if (need_db) db = da_rows.sum(0);
  return {dx, dw, db};
}

std::optional<at::Tensor> defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t : std::nullopt;
}

}  // namespace

Tensors6 fused_layer_forward_keeping_windows(
    const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t kind, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, bool norm, bool training, double momentum, double eps,
    int64_t groups, int64_t act, double slope, at::Tensor* windows) {
  check_dtype(x_, "fused_layer_forward", "x");
  check_dtype(weight_, "fused_layer_forward", "weight");
  const auto dtype = x_.scalar_type();
  TORCH_CHECK(weight_.scalar_type() == dtype, "vaegan_fast native fused_layer_forward: weight has dtype ",
              weight_.scalar_type(), ", x has ", dtype);
  TORCH_CHECK(kind >= kDense && kind <= kConvTranspose && act >= kIdentity && act <= kGelu,
              "vaegan_fast native fused_layer_forward: unknown kind ", kind, " or activation ", act);
  TORCH_CHECK(x_.dim() == (kind == kDense ? 2 : 4) && x_.size(0) > 0 && groups >= 1 && x_.size(0) % groups == 0,
              "vaegan_fast native fused_layer_forward: x must be ", kind == kDense ? "[N, K]" : "[N, C, H, W]",
              " with N a multiple of ", groups, " groups, got ", x_.sizes());
  const auto bias = defined(bias_);
  TORCH_CHECK(!norm || (defined(norm_weight) && defined(norm_bias) && defined(running_mean) && defined(running_var)),
              "vaegan_fast native fused_layer_forward: a norm needs its weight, bias and running statistics");
  // The operands as the product reads them: channels-last for convolutions (oneDNN's layout), fp32 for bf16.
  const at::Tensor x = kind == kDense ? x_.contiguous() : x_.contiguous(at::MemoryFormat::ChannelsLast);
  const auto pdt = layer_product_dtype(dtype, kind, weight_);
  // A column-path conv's bias goes into the activation's pass rather than addmm, whose bias is a pass of its own
  // over the output (a copy, then the GEMM reads it back); not where a rounding to bf16 comes between (the bias
  // then belongs to the fp32 product, see linear_act.cpp) nor before a norm.
  const bool bias_in_epilogue = bias && kind == kConv && column_path(kind, weight_) && !norm && act != kIdentity &&
                                pdt == dtype;
  std::optional<at::Tensor> bias_p;
  if (bias && !bias_in_epilogue) bias_p = bias->to(pdt);
  at::Tensor a = product(kind, x.to(pdt), weight_.to(pdt), bias_p, stride, padding, output_padding, windows);
  a = rows_layout(a.to(dtype));
  RECORD_FUNCTION("fused_layer::epilogue", std::vector<c10::IValue>());
  const int64_t M = matrix_rows(a), C = a.size(1);
  // Each empty output its own tensor: a custom op's outputs must not alias one another.
  auto none = [&] { return at::empty({0}, a.options()); };
  const bool keep_pre = keeps_preactivation(act, slope);
  if (!norm) {
    at::Tensor kept = keep_pre ? at::empty_like(a) : none();
    if (act != kIdentity && M * C > 0) {
      VFN_DISPATCH(dtype, "fused_layer_forward", [&] {
        using A = acc_t<scalar_t>;
        const at::Tensor b =
            bias_in_epilogue ? bias->to(c10::CppTypeToScalarType<A>::value).contiguous() : at::Tensor();
        with_activation(act, [&](auto activation) {
          act_in_place<decltype(activation)::value, scalar_t>(a.mutable_data_ptr<scalar_t>(),
                                                              keep_pre ? kept.mutable_data_ptr<scalar_t>() : nullptr,
                                                              b.defined() ? b.const_data_ptr<A>() : nullptr, M, C,
                                                              A(slope));
        });
      });
    }
    // Outputs never alias inputs or each other (a custom op's contract): an empty x_used means x itself, an
    // empty kept means y.
    return {a, x.is_same(x_) ? none() : x, none(), kept, none(), none()};
  }
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t G = training ? groups : 1;
  std::vector<double> mean, var;
  if (training) {
    VFN_DISPATCH(dtype, "fused_layer_forward", [&] { batch_stats<scalar_t>(a.const_data_ptr<scalar_t>(), M, C, G,
                                                                          mean, var); });
  } else {
    auto rm = running_mean->to(at::kDouble).contiguous(), rv = running_var->to(at::kDouble).contiguous();
    mean.assign(rm.const_data_ptr<double>(), rm.const_data_ptr<double>() + C);
    var.assign(rv.const_data_ptr<double>(), rv.const_data_ptr<double>() + C);
  }
  auto gamma = norm_weight->to(at::kDouble).contiguous(), beta = norm_bias->to(at::kDouble).contiguous();
  at::Tensor mean_t = at::empty({G, C}, a.options().dtype(acc)), rstd_t = at::empty({G, C}, a.options().dtype(acc));
  at::Tensor y = at::empty_like(a), kept = keep_pre ? at::empty_like(a) : none();
  VFN_DISPATCH(dtype, "fused_layer_forward", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> k(G * C), s(G * C);
    A* mp = mean_t.mutable_data_ptr<A>();
    A* rp = rstd_t.mutable_data_ptr<A>();
    for (int64_t i = 0; i < G * C; ++i) {
      const double rstd = 1.0 / std::sqrt(var[i] + eps), g = gamma.const_data_ptr<double>()[i % C];
      mp[i] = A(mean[i]);
      rp[i] = A(rstd);
      k[i] = A(g * rstd);
      s[i] = A(beta.const_data_ptr<double>()[i % C] - mean[i] * g * rstd);
    }
    with_activation(act, [&](auto activation) {
      affine_act_kernel<decltype(activation)::value, scalar_t>(
          a.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
          keep_pre ? kept.mutable_data_ptr<scalar_t>() : nullptr, k.data(), s.data(), M, C, G, A(slope));
    });
  });
  if (training) {
    // nn.BatchNorm's running averages, one update per group in row order (unbiased variance).
    const double count = double(M / G), unbias = count / std::max(count - 1.0, 1.0);
    auto mean_g = at::from_blob(mean.data(), {G, C}, at::TensorOptions().dtype(at::kDouble)).to(acc, false, true);
    auto var_g = at::from_blob(var.data(), {G, C}, at::TensorOptions().dtype(at::kDouble)).to(acc, false, true);
    for (int64_t g = 0; g < G; ++g) {
      running_mean->mul_(1 - momentum).add_(mean_g[g].to(running_mean->scalar_type()), momentum);
      running_var->mul_(1 - momentum).add_((var_g[g] * unbias).to(running_var->scalar_type()), momentum);
    }
    if (defined(num_batches_tracked)) num_batches_tracked->add_(G);
  }
  return {y, x.is_same(x_) ? none() : x, a, kept, mean_t, rstd_t};
}

Tensors5 fused_layer_backward_with_windows(
    const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& weight_, bool has_bias,
    const std::optional<at::Tensor>& pre_, const at::Tensor& kept_, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& rstd, const std::optional<at::Tensor>& norm_weight, int64_t kind,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, bool norm, bool training,
    int64_t groups, int64_t act, double slope, bool entry_pre_norm, bool need_dx, bool need_dw, int64_t dx_start,
    int64_t dx_rows, bool dy_writable, const at::Tensor& windows) {
  check_dtype(x, "fused_layer_backward", "x");
  const auto dtype = x.scalar_type();
  auto none = [&] { return at::empty({0}, x.options()); };
  const at::Tensor dy = rows_layout(dy_.to(dtype));
  const int64_t M = matrix_rows(dy), C = dy.size(1);
  at::Tensor da = dy, dgamma = none(), dbeta = none();
  if (!entry_pre_norm && (norm || act != kIdentity)) {
    RECORD_FUNCTION("fused_layer::norm_act_backward", std::vector<c10::IValue>());
    const at::Tensor kept = act != kIdentity ? rows_layout(kept_) : at::Tensor();
    TORCH_CHECK(!kept.defined() || kept.sizes() == dy.sizes(),
                "vaegan_fast native fused_layer_backward: the saved tensor does not match dy ", dy.sizes());
    // da over dy itself when the caller gives dy up (the training step's streams do: fresh memory costs page
    // faults on every step), or when dy is already a copy of ours.
    da = dy_writable || !dy.is_same(dy_) ? dy : at::empty_like(dy);
    if (!norm) {
      VFN_DISPATCH(dtype, "fused_layer_backward", [&] {
        with_activation(act, [&](auto activation) {
          act_backward<decltype(activation)::value, scalar_t>(dy.const_data_ptr<scalar_t>(),
                                                              kept.defined() ? kept.const_data_ptr<scalar_t>() : nullptr,
                                                              da.mutable_data_ptr<scalar_t>(), M, C,
                                                              acc_t<scalar_t>(slope));
        });
      });
    } else {
      const at::Tensor pre = rows_layout(*pre_);
      const int64_t G = training ? groups : 1;
      TORCH_CHECK(G >= 1 && mean.has_value() && rstd.has_value() && pre_.has_value() && mean->size(0) == G &&
                      M % G == 0, "vaegan_fast native fused_layer_backward: ", G,
                  " groups of statistics for ", M, " rows");
      auto gamma = norm_weight->to(at::kDouble).contiguous();
      auto mean_d = mean->to(at::kDouble).contiguous(), rstd_d = rstd->to(at::kDouble).contiguous();
      VFN_DISPATCH(dtype, "fused_layer_backward", [&] {
        using A = acc_t<scalar_t>;
        std::vector<A> mean_a(mean_d.const_data_ptr<double>(), mean_d.const_data_ptr<double>() + G * C);
        const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
        const scalar_t* kp = kept.defined() ? kept.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* ap = pre.const_data_ptr<scalar_t>();
        std::vector<double> sums;
        with_activation(act, [&](auto activation) {
          constexpr int64_t Act = decltype(activation)::value;
          const typename Chunk<scalar_t>::V slope_v(static_cast<A>(slope));
          // s1 = sum dh, s2 = sum dh (a - mean): [G, 2, C]
          sums = group_channel_sums<scalar_t>(M, C, G, 2, [&](int64_t r, int64_t g, A* out) {
            const A* mu = mean_a.data() + g * C;
            for_chunks<scalar_t>(0, C, [&](int64_t j, int64_t m) {
              const int64_t off = r * C + j;
              Chunk<scalar_t> h = grad_pre_act<Act, scalar_t>(dyp, kp, off, m, slope_v);
              Chunk<scalar_t> av;
              av.load(ap + off, m);
              Chunk<A> mc, s1, s2;
              mc.load(mu + j, m);
              s1.load(out + j, m);
              s2.load(out + C + j, m);
              for (int q = 0; q < Chunk<scalar_t>::kVecs; ++q) {
                s1.v[q] = s1.v[q] + h.v[q];
                s2.v[q] = at::vec::fmadd(h.v[q], av.v[q] - mc.v[q], s2.v[q]);
              }
              s1.store(out + j, m);
              s2.store(out + C + j, m);
            });
          });
        });
        std::vector<A> k(G * C), k2(G * C), k3(G * C);
        std::vector<double> dg(C, 0.0), db(C, 0.0);
        const double count = double(M / G);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = g * C + c;
            const double s1 = sums[g * 2 * C + c], s2 = sums[g * 2 * C + C + c];
            const double r = rstd_d.const_data_ptr<double>()[i], kk = gamma.const_data_ptr<double>()[c] * r;
            dg[c] += s2 * r;
            db[c] += s1;
            k[i] = A(kk);
            k2[i] = training ? A(-kk * r * r * s2 / count) : A(0);
            k3[i] = training ? A(kk * (r * r * s2 * mean_d.const_data_ptr<double>()[i] - s1) / count) : A(0);
          }
        with_activation(act, [&](auto activation) {
          norm_backward_apply<decltype(activation)::value, scalar_t>(
              dyp, kp, ap, da.mutable_data_ptr<scalar_t>(), k.data(), training ? k2.data() : nullptr,
              training ? k3.data() : nullptr, M, C, G, A(slope));
        });
        if (need_dw) {
          dgamma = at::from_blob(dg.data(), {C}, at::TensorOptions().dtype(at::kDouble)).to(dtype, false, true);
          dbeta = at::from_blob(db.data(), {C}, at::TensorOptions().dtype(at::kDouble)).to(dtype, false, true);
        }
      });
    }
  }
  // The products' backward, in fp32 for bf16; dx on rows [dx_start, dx_start + dx_rows) of the ones given (the
  // rows the layer below needs: a stream through a norm runs its norm on whole groups, its product on fewer).
  const auto pdt = layer_product_dtype(dtype, kind, weight_);
  const at::Tensor da_p = da.to(pdt), x_p = x.to(pdt), w_p = weight_.to(pdt);
  const int64_t n = dy.size(0);
  TORCH_CHECK(!need_dx || (dx_start >= 0 && dx_rows >= 0 && dx_start + dx_rows <= n),
              "vaegan_fast native fused_layer_backward: dx rows [", dx_start, ", ", dx_start + dx_rows,
              ") outside the ", n, " rows given");
  const bool all_rows = dx_start == 0 && dx_rows == n;
  const at::Tensor da_dx = all_rows ? da_p : da_p.narrow(0, dx_start, dx_rows);
  const at::Tensor x_dx = all_rows ? x_p : x_p.narrow(0, dx_start, dx_rows);
  at::Tensor dx = none(), dw = none(), db = none();
  if (kind == kDense) {
    if (need_dx) dx = product_mm(da_dx, w_p).to(dtype);
    if (need_dw) {
      dw = product_mm(da_p.t(), x_p).to(dtype);
      if (has_bias) db = da_p.sum(0).to(dtype);
    }
  } else if (column_path(kind, weight_)) {
    // One call when dx runs on every row: a transposed conv's two products then share one gather of da.
    const bool together = all_rows && need_dx && need_dw;
    if (need_dx && !together)
      dx = std::get<0>(column_backward(kind, da_dx, x_dx, w_p, stride, padding, true, false, false, at::Tensor()))
               .to(dtype);
    if (need_dw) {
      auto [gx, gw, gb] = column_backward(kind, da_p, x_p, w_p, stride, padding, together, true, has_bias,
                                          windows.defined() ? windows.to(pdt) : windows);
      if (together) dx = gx.to(dtype);
      dw = gw.to(dtype).contiguous();
      if (has_bias) db = gb.to(dtype);
    }
  } else {
    const int64_t out_channels = kind == kConv ? weight_.size(0) : weight_.size(1);
    std::vector<int64_t> bias_sizes = {out_channels};
    auto conv_backward = [&](const at::Tensor& g, const at::Tensor& input, bool want_dx, bool want_dw) {
      return at::convolution_backward(
          g, input, w_p, has_bias && want_dw ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt, stride,
          padding, {1, 1}, kind == kConvTranspose, output_padding, 1, {want_dx, want_dw, has_bias && want_dw});
    };
    if (all_rows && (need_dx || need_dw)) {  // one call for both
      auto [gx, gw, gb] = conv_backward(da_p, x_p, need_dx, need_dw);
      if (need_dx) dx = gx.to(dtype);
      if (need_dw) {
        dw = gw.to(dtype).contiguous();  // oneDNN may hand it back channels-last: the weight's own layout
        if (has_bias) db = gb.to(dtype);
      }
    } else {
      if (need_dx) dx = std::get<0>(conv_backward(da_dx, x_dx, true, false)).to(dtype);
      if (need_dw) {
        auto [unused, gw, gb] = conv_backward(da_p, x_p, false, true);
        dw = gw.to(dtype).contiguous();
        if (has_bias) db = gb.to(dtype);
      }
    }
  }
  // A conv's input gradient channels-last, whatever the path: the layout the layer below reads.
  if (kind != kDense && need_dx) dx = dx.contiguous(at::MemoryFormat::ChannelsLast);
  return {dx, dw, db, dgamma, dbeta};
}

namespace {

// The ops as registered: the window rows gathered in each call.
Tensors6 fused_layer_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, int64_t kind, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, bool norm, bool training, double momentum, double eps,
    int64_t groups, int64_t act, double slope) {
  return fused_layer_forward_keeping_windows(x, weight, bias, norm_weight, norm_bias, running_mean, running_var,
                                             num_batches_tracked, kind, stride, padding, output_padding, norm,
                                             training, momentum, eps, groups, act, slope, nullptr);
}

Tensors5 fused_layer_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    const std::optional<at::Tensor>& pre, const at::Tensor& kept, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& rstd, const std::optional<at::Tensor>& norm_weight, int64_t kind,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding, bool norm, bool training,
    int64_t groups, int64_t act, double slope, bool entry_pre_norm, bool need_dx, bool need_dw, int64_t dx_start,
    int64_t dx_rows, bool dy_writable) {
  return fused_layer_backward_with_windows(dy, x, weight, has_bias, pre, kept, mean, rstd, norm_weight, kind, stride,
                                           padding, output_padding, norm, training, groups, act, slope,
                                           entry_pre_norm, need_dx, need_dw, dx_start, dx_rows, dy_writable,
                                           at::Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) {
  m.impl("fused_layer_forward", &fused_layer_forward);
  m.impl("fused_layer_backward", &fused_layer_backward);
}

}  // namespace vaegan_fast_native
