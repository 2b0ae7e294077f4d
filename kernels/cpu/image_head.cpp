// The decoder's image head inside the routed training step (vaegan_fast/step.py), on the CPU: the sigmoid
// that turns logits into images, the pixel BCE term, and the gradient back through the sigmoid, each one pass.
//
// Rows [prior; reconstruction] of R = 2B rows, P pixels; s = sigmoid(l), e = exp(-|l|) shared by both:
//   forward   images = s = (l >= 0 ? 1 : e) / (1 + e)                                      all R rows
//             pixel  = sum over reconstruction rows of softplus(l) - x l,  / B             (BCE with logits)
//                      softplus(l) = max(l, 0) + log1p(e)
//   backward  s' = s (1 - s),  p = c (s - x) with c = pixel_weight / B (0 without the pixel term)
//             dec_up[prior] = g[prior] s'
//             dec_up[rec]   = (g[rec] (if reconstructions are fakes) + gamma u) s' + p
//             enc_up        = u s' + p
//   g: the generator loss's gradient at the discriminator's input (rows prior, and reconstruction when they
//   are fakes), u: the feature-reconstruction gradient there (reconstruction rows).
//
// Bytes moved, n = B P elements of size e: forward reads l (2 n e) and x (n e) and writes s (2 n e); backward
// reads s (2 n e), g (n e or 2 n e), u and x (2 n e) and writes dec_up (2 n e) and enc_up (n e). The eager
// sequence it replaces (sigmoid, BCE with logits, rsub, mul, add, copy, mul, mul, sub, mul, add, add) makes
// about 12 passes and as many temporaries.
//
// The pixel sum: fixed tasks of whole row pairs, a double partial per task, added in task order (the same
// result with any thread count).
#include "common.h"

namespace vaegan_fast_native {
namespace {

// Tasks take rows in pairs (prior row i and reconstruction row B + i): only reconstruction rows carry the
// pixel term, and pairing gives every thread its share of it.
template <typename T>
void head_forward_kernel(const T* logits, const T* x, T* images, int64_t B, int64_t P, bool with_pixel,
                         double* partials, int64_t pairs_per_task) {
  using A = acc_t<T>;
  for_tasks(ceil_div(B, pairs_per_task), [&](int64_t task) {
    const int64_t cols = P, batch = B;
    const bool pixel = with_pixel;
    A bl[kBlock], bx[kBlock], e[kBlock], sp[kBlock], bs[kBlock], terms[kBlock];
    double acc = 0;
    const int64_t i1 = std::min(batch, (task + 1) * pairs_per_task);
    for (int64_t q = 2 * task * pairs_per_task; q < 2 * i1; ++q) {
      const bool rec = q & 1;
      const int64_t r = (q >> 1) + (rec ? batch : 0);
      for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - j0), off = r * cols + j0;
        const A* l = load(logits + off, bl, n);
        for (int64_t i = 0; i < n; ++i) e[i] = -std::abs(l[i]);
        vexp(e, e, n);
        A* s = out_ptr(images + off, bs);
        for (int64_t i = 0; i < n; ++i) s[i] = (l[i] >= A(0) ? A(1) : e[i]) / (A(1) + e[i]);
        finish(s, images + off, n);
        if (rec && pixel) {
          const A* xv = load(x + (r - batch) * cols + j0, bx, n);
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
                          int64_t P, acc_t<T> gamma, acc_t<T> factor, bool recon_as_fake,
                          int64_t pairs_per_task) {
  using A = acc_t<T>;
  for_tasks(ceil_div(B, pairs_per_task), [&](int64_t task) {
    const int64_t cols = P, batch = B;
    const A gm = gamma, c = factor;  // locals: see common.h on captured scalars
    const bool fake_rec = recon_as_fake;
    A bs[kBlock], bg[kBlock], bu[kBlock], bx[kBlock], sl[kBlock], bd[kBlock], be[kBlock];
    const int64_t i1 = std::min(batch, (task + 1) * pairs_per_task);
    for (int64_t q = 2 * task * pairs_per_task; q < 2 * i1; ++q) {
      const int64_t r = (q >> 1) + ((q & 1) ? batch : 0);  // rows in pairs, as in the forward
      for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - j0), off = r * cols + j0;
        const A* s = load(images + off, bs, n);
        for (int64_t i = 0; i < n; ++i) sl[i] = s[i] * (A(1) - s[i]);
        A* d = out_ptr(dec_up + off, bd);
        if (r < batch) {
          const A* gv = load(g + off, bg, n);
          for (int64_t i = 0; i < n; ++i) d[i] = gv[i] * sl[i];
        } else {
          const int64_t roff = (r - batch) * cols + j0;
          const A* uv = load(u + roff, bu, n);
          const A* xv = load(x + roff, bx, n);
          A* eo = out_ptr(enc_up + roff, be);
          if (fake_rec) {
            const A* gv = load(g + off, bg, n);
            for (int64_t i = 0; i < n; ++i) {
              const A p = c * (s[i] - xv[i]);
              d[i] = (gv[i] + gm * uv[i]) * sl[i] + p;
              eo[i] = uv[i] * sl[i] + p;
            }
          } else {
            for (int64_t i = 0; i < n; ++i) {
              const A p = c * (s[i] - xv[i]);
              d[i] = gm * uv[i] * sl[i] + p;
              eo[i] = uv[i] * sl[i] + p;
            }
          }
          finish(eo, enc_up + roff, n);
        }
        finish(d, dec_up + off, n);
      }
    }
  });
}

void check_head(const at::Tensor& t, const char* op, const char* name, int64_t rows, int64_t P,
                at::ScalarType dtype) {
  check_dtype(t, op, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == P && t.is_contiguous(),
              "vaegan_fast native ", op, ": ", name, " must be a contiguous [", rows, ", ", P, "] tensor, got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "vaegan_fast native ", op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
}

// B and P of a [2B, P] tensor (rows prior; reconstruction).
std::pair<int64_t, int64_t> head_shape(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) % 2 == 0 && t.size(0) > 0, "vaegan_fast native ", op, ": ", name,
              " must be [2B, P] (rows prior; reconstruction)");
  return {t.size(0) / 2, t.size(1)};
}

// Row pairs per parallel task: about kTask elements (fixed, so the pixel sum does not depend on threads).
int64_t pairs_for(int64_t P) { return std::max<int64_t>(1, kTask / std::max<int64_t>(2 * P, 1)); }

}  // namespace

at::Tensor image_head_forward(const at::Tensor& logits, const at::Tensor& x, const at::Tensor& images,
                              bool with_pixel) {
  const auto [B, P] = head_shape(logits, "image_head_forward", "logits");
  const auto dtype = logits.scalar_type();
  check_head(logits, "image_head_forward", "logits", 2 * B, P, dtype);
  check_head(x, "image_head_forward", "x", B, P, dtype);
  check_head(images, "image_head_forward", "images", 2 * B, P, dtype);
  const int64_t pairs = pairs_for(P);
  std::vector<double> partials(ceil_div(B, pairs), 0.0);
  VFN_DISPATCH(dtype, "image_head_forward", [&] {
    head_forward_kernel<scalar_t>(logits.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  images.mutable_data_ptr<scalar_t>(), B, P, with_pixel, partials.data(),
                                  pairs);
  });
  double total = 0;
  for (double p : partials) total += p;
  // The loss in fp32 at least (a bf16 sum of B P terms would keep 3 digits).
  const auto loss_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(with_pixel ? total / double(B) : 0.0, logits.options().dtype(loss_dtype));
}

std::tuple<at::Tensor, at::Tensor> image_head_backward(const at::Tensor& images, const at::Tensor& x,
                                                       const at::Tensor& g_fake, const at::Tensor& u_rec,
                                                       double gamma, double pixel_factor, bool recon_as_fake) {
  const auto [B, P] = head_shape(images, "image_head_backward", "images");
  const auto dtype = images.scalar_type();
  check_head(images, "image_head_backward", "images", 2 * B, P, dtype);
  check_head(x, "image_head_backward", "x", B, P, dtype);
  check_head(g_fake, "image_head_backward", "g_fake", recon_as_fake ? 2 * B : B, P, dtype);
  check_head(u_rec, "image_head_backward", "u_rec", B, P, dtype);
  auto dec_up = at::empty({2 * B, P}, images.options());
  auto enc_up = at::empty({B, P}, images.options());
  const int64_t pairs = pairs_for(P);
  VFN_DISPATCH(dtype, "image_head_backward", [&] {
    using A = acc_t<scalar_t>;
    head_backward_kernel<scalar_t>(images.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   g_fake.const_data_ptr<scalar_t>(), u_rec.const_data_ptr<scalar_t>(),
                                   dec_up.mutable_data_ptr<scalar_t>(), enc_up.mutable_data_ptr<scalar_t>(), B, P,
                                   A(gamma), A(pixel_factor), recon_as_fake, pairs);
  });
  return {dec_up, enc_up};
}

TORCH_LIBRARY_IMPL(vaegan_fast_native, CPU, m) {
  m.impl("image_head_forward", &image_head_forward);
  m.impl("image_head_backward", &image_head_backward);
}

}  // namespace vaegan_fast_native
