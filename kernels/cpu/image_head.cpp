// The decoder's image head inside the training step (vaegan_fast/ops/image_head.py is its specification), on the
// CPU: the sigmoid that turns logits into images, the pixel BCE term, and the gradient back through the
// sigmoid, each one pass.
//
// R = B or 2B image rows of P values (any per-row shape; every argument in one memory layout, read flat), the
// last B rows reconstructions of x; s = sigmoid(l), e = exp(-|l|) shared by both:
//   forward   images = s = (l >= 0 ? 1 : e) / (1 + e)                                      all R rows
//             pixel  = sum over the last B rows of softplus(l) - x l,  / B                 (BCE with logits)
//                      softplus(l) = max(l, 0) + log1p(e)
//   backward  (R = 2B: rows [prior; reconstruction])  s' = s (1 - s),  p = c (s - x), c = pixel_weight / B
//             dec_up[prior] = (g[prior] + gamma u[prior]) s'          (u[prior] only when u covers 2B rows)
//             dec_up[rec]   = (g[rec] + gamma u[rec]) s' + p           (g[rec] only when g covers 2B rows)
//             enc_up        = u[rec] s' + p
//   g: the generator loss's gradient at the discriminator's input, u: the feature-reconstruction gradient there
//   (on every row when a batch norm in the discriminator couples them).
//
// Bytes moved, n = B P elements of size e: forward reads l (2 n e) and x (n e) and writes s (2 n e); backward
// reads s (2 n e), g (n e or 2 n e), u (n e or 2 n e) and x (n e) and writes dec_up (2 n e) and enc_up (n e). The
// eager sequence it replaces (sigmoid, BCE with logits, rsub, mul, add, copy, mul, mul, sub, mul, add, add)
// makes about 12 passes and as many temporaries.
//
// The pixel sum: fixed tasks of whole row pairs (prior row i with reconstruction row B + i, so that every task
// has its share of the pixel term), a double partial per task, added in task order (the same result with any
// thread count).
#include "common.h"

namespace vaegan_fast_native {
namespace {

// Tasks take rows in pairs (prior row i and reconstruction row B + i): only reconstruction rows carry the
// pixel term, and pairing gives every thread its share of it.
template <typename T>
void head_forward_kernel(const T* logits, const T* x, T* images, int64_t R, int64_t B, int64_t P, bool with_pixel,
                         double* partials, int64_t pairs_per_task) {
  using A = acc_t<T>;
  const int64_t per_pair = R / B;  // 2: a prior and a reconstruction row; 1: reconstructions only
  for_tasks(ceil_div(B, pairs_per_task), [&](int64_t task) {
    const int64_t cols = P, batch = B, first_rec = R - B, width = per_pair;
    const bool pixel = with_pixel;
    A bl[kBlock], bx[kBlock], e[kBlock], sp[kBlock], bs[kBlock], terms[kBlock];
    double acc = 0;
    const int64_t i1 = std::min(batch, (task + 1) * pairs_per_task);
    for (int64_t q = width * task * pairs_per_task; q < width * i1; ++q) {
      const bool rec = width == 1 || (q & 1);
      const int64_t r = q / width + (rec ? first_rec : 0);
      for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - j0), off = r * cols + j0;
        const A* l = load(logits + off, bl, n);
        for (int64_t i = 0; i < n; ++i) e[i] = -std::abs(l[i]);
        vexp(e, e, n);
        A* s = out_ptr(images + off, bs);
        for (int64_t i = 0; i < n; ++i) s[i] = (l[i] >= A(0) ? A(1) : e[i]) / (A(1) + e[i]);
        finish(s, images + off, n);
        if (rec && pixel) {
          const A* xv = load(x + (r - first_rec) * cols + j0, bx, n);
          vlog1p(e, sp, n);
          for (int64_t i = 0; i < n; ++i) terms[i] = sp[i] + std::max(l[i], A(0)) - xv[i] * l[i];
          acc += lane_sum(terms, n);
        }
      }
    }
    partials[task] = acc;
  });
}

template <typename T>
void head_backward_kernel(const T* images, const T* x, const T* g, const T* u, T* dec_up, T* enc_up, int64_t B,
                          int64_t P, acc_t<T> gamma, acc_t<T> factor, bool g_has_rec, bool u_has_prior,
                          int64_t pairs_per_task) {
  using A = acc_t<T>;
  for_tasks(ceil_div(B, pairs_per_task), [&](int64_t task) {
    const int64_t cols = P, batch = B;
    const A gm = gamma, c = factor;  // locals: see common.h on captured scalars
    const bool g_rec = g_has_rec, u_prior = u_has_prior;
    A bs[kBlock], bg[kBlock], bu[kBlock], bx[kBlock], sl[kBlock], bd[kBlock], be[kBlock];
    const int64_t i1 = std::min(batch, (task + 1) * pairs_per_task);
    for (int64_t q = 2 * task * pairs_per_task; q < 2 * i1; ++q) {
      const bool rec = q & 1;
      const int64_t i = q >> 1, r = i + (rec ? batch : 0);  // rows in pairs, as in the forward
      for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - j0), off = r * cols + j0;
        const A* s = load(images + off, bs, n);
        for (int64_t k = 0; k < n; ++k) sl[k] = s[k] * (A(1) - s[k]);
        A* d = out_ptr(dec_up + off, bd);
        if (!rec) {
          const A* gv = load(g + off, bg, n);
          if (u_prior) {
            const A* uv = load(u + off, bu, n);
            for (int64_t k = 0; k < n; ++k) d[k] = (gv[k] + gm * uv[k]) * sl[k];
          } else {
            for (int64_t k = 0; k < n; ++k) d[k] = gv[k] * sl[k];
          }
        } else {
          const int64_t roff = i * cols + j0;
          const A* uv = load(u + (u_prior ? off : roff), bu, n);
          const A* xv = load(x + roff, bx, n);
          A* eo = out_ptr(enc_up + roff, be);
          if (g_rec) {
            const A* gv = load(g + off, bg, n);
            for (int64_t k = 0; k < n; ++k) {
              const A p = c * (s[k] - xv[k]);
              d[k] = (gv[k] + gm * uv[k]) * sl[k] + p;
              eo[k] = uv[k] * sl[k] + p;
            }
          } else {
            for (int64_t k = 0; k < n; ++k) {
              const A p = c * (s[k] - xv[k]);
              d[k] = gm * uv[k] * sl[k] + p;
              eo[k] = uv[k] * sl[k] + p;
            }
          }
          finish(eo, enc_up + roff, n);
        }
        finish(d, dec_up + off, n);
      }
    }
  });
}

// Every argument of the head is read as flat rows: one memory layout for all (contiguous, or channels-last for
// [N, C, H, W] images), the per-row shape of `like`, and `rows` rows.
void check_head(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name, int64_t rows) {
  check_dtype(t, op, name);
  const auto fmt = like.suggest_memory_format();
  TORCH_CHECK(t.dim() == like.dim() && t.size(0) == rows && t.sizes().slice(1) == like.sizes().slice(1) &&
                  t.is_contiguous(fmt) && like.is_contiguous(fmt),
              "vaegan_fast native ", op, ": ", name, " must be [", rows, ", ...] of the images' per-row shape ",
              like.sizes().slice(1), " and memory layout, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "vaegan_fast native ", op, ": ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
}

// Row pairs per parallel task: about kTask elements (fixed, so the pixel sum does not depend on threads).
int64_t pairs_for(int64_t P) { return std::max<int64_t>(1, kTask / std::max<int64_t>(2 * P, 1)); }

}  // namespace

at::Tensor image_head_forward(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& images,
                              bool with_pixel) {
  TORCH_CHECK(logits.dim() >= 2 && x.dim() == logits.dim() && x.size(0) > 0 &&
                  (logits.size(0) == x.size(0) || logits.size(0) == 2 * x.size(0)),
              "vaegan_fast native image_head_forward: logits must hold B or 2B rows for x's B, got ", logits.sizes(),
              " and ", x.sizes());
  const int64_t R = logits.size(0), B = x.size(0), P = logits.numel() / R;
  check_head(logits, logits, "image_head_forward", "logits", R);
  check_head(x, logits, "image_head_forward", "x", B);
  check_head(images, logits, "image_head_forward", "images", R);
  const auto dtype = logits.scalar_type();
  const int64_t pairs = pairs_for(P);
  std::vector<double> partials(ceil_div(B, pairs), 0.0);
  VFN_DISPATCH(dtype, "image_head_forward", [&] {
    head_forward_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  images.mutable_data_ptr<scalar_t>(), R, B, P, with_pixel, partials.data(), pairs);
  });
  double total = 0;
  for (double p : partials) total += p;
  // The loss in fp32 at least (a bf16 sum of B P terms would keep 3 digits).
  const auto loss_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(with_pixel ? total / double(B) : 0.0, logits.options().dtype(loss_dtype));
}

std::tuple<at::Tensor, at::Tensor> image_head_backward(const at::Tensor& images, const at::Tensor& x,
                                                       const at::Tensor& g, const at::Tensor& u, double gamma,
                                                       double pixel_factor, bool g_has_rec, bool u_has_prior) {
  TORCH_CHECK(images.dim() >= 2 && x.dim() == images.dim() && images.size(0) == 2 * x.size(0) && x.size(0) > 0,
              "vaegan_fast native image_head_backward: images must be [2B, ...] (rows prior; reconstruction) for "
              "x's B, got ", images.sizes(), " and ", x.sizes());
  const int64_t B = x.size(0), P = images.numel() / (2 * B);
  check_head(images, images, "image_head_backward", "images", 2 * B);
  check_head(x, images, "image_head_backward", "x", B);
  check_head(g, images, "image_head_backward", "g", g_has_rec ? 2 * B : B);
  check_head(u, images, "image_head_backward", "u", u_has_prior ? 2 * B : B);
  auto dec_up = at::empty_like(images);
  auto enc_up = at::empty_like(x);
  const int64_t pairs = pairs_for(P);
  VFN_DISPATCH(images.scalar_type(), "image_head_backward", [&] {
    using A = acc_t<scalar_t>;
    head_backward_kernel<scalar_t>(images.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                   dec_up.mutable_data_ptr<scalar_t>(), enc_up.mutable_data_ptr<scalar_t>(), B, P,
                                   A(gamma), A(pixel_factor), g_has_rec, u_has_prior, pairs);
  });
  return {dec_up, enc_up};
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) {
  m.impl("image_head_forward", &image_head_forward);
  m.impl("image_head_backward", &image_head_backward);
}

}  // namespace vaegan_fast_native
