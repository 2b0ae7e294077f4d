// Shared pieces of the native CPU kernels (reparam_kl.cpp, gan_losses.cpp, linear_act.cpp, image_head.cpp).
//
// Every kernel cuts the tensor into fixed-size tasks (kTask elements, or whole rows adding up to about kTask
// elements) that run in parallel under at::parallel_for. Inside a task the data goes one of two ways:
//   - register chunks (Chunk<T>, for_chunks): 16 values at a time in ATen Vectorized registers of the
//     accumulation type, bf16 widened on load and rounded to nearest even on store in the registers. The
//     one-pass kernels (feature_recon, scale_grad, reparam_kl, linear_act's bias/activation and derivative
//     passes) are written this way;
//   - scratch blocks of kBlock elements that stay in L1: load (bf16 -> fp32; fp32/fp64 used in place), plain
//     loops over the block that gcc auto-vectorises (build with -DVAEGAN_FAST_VEC_REPORT=ON to see
//     -fopt-info-vec), exp/log1p/tanh through ATen's Vectorized (Sleef, 1-ulp), store (fp32 -> bf16, round to
//     nearest even). The softplus losses and the image head, whose several transcendental steps share a
//     block, are written this way.
// Reductions: each task's partial sum goes to its own slot, and the slots are added in task order after the
// parallel loop. Task boundaries depend only on the shape, never on the thread count, so results are
// bitwise the same with 1 or N threads.
#pragma once

// Only the ATen headers the kernels use (not <ATen/ATen.h>, which alone doubles the build time).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace vaegan_fast_native {

constexpr int64_t kBlock = 256;   // elements per scratch block (a few blocks of fp32 fit in L1)
constexpr int64_t kTask = 16384;  // elements per parallel task (fixed: results do not depend on threads)

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename T>
using acc_t = typename AccType<T>::type;

// ---- loads and stores --------------------------------------------------------------------------------
// load(): a pointer to n values in the accumulation type: the source itself when it already is, else buf.
inline const float* load(const float* src, float*, int64_t) { return src; }
inline const double* load(const double* src, double*, int64_t) { return src; }
inline const float* load(const c10::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(buf);  // built with -fno-strict-aliasing
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  return buf;
}

// out_ptr(): where to compute n outputs: the destination itself when it has the accumulation type, else buf;
// finish() then converts buf into the destination (a no-op when they are the same).
inline float* out_ptr(float* dst, float*) { return dst; }
inline double* out_ptr(double* dst, double*) { return dst; }
inline float* out_ptr(c10::BFloat16*, float* buf) { return buf; }
inline void finish(const float*, float*, int64_t) {}
inline void finish(const double*, double*, int64_t) {}
inline void finish(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = s[i];
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    d[i] = static_cast<uint16_t>(((u & 0x7FFFFFFFu) > 0x7F800000u) ? quiet_nan : rounded);
  }
}

// ---- a chunk of values in registers -------------------------------------------------------------------
// Chunk<T>: kSize consecutive values of T held as kVecs vectors of the accumulation type (16 values: two
// AVX2 vectors of fp32, four of fp64). bf16 is widened on load and rounded to nearest even on store inside
// the registers, so a one-pass kernel written with chunks touches no scratch block: for bf16 the block
// kernels above pay three L1 passes per value (widen, compute, round), which made them slower than fp32
// (measured: a scaled copy of 512x512 bf16 took 87 us against 30 us in fp32). The forms with a count n <= kSize
// serve the end of a range: they read zeros past the n values and write only n.
template <typename T>
struct Chunk {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr int64_t kSize = at::vec::Vectorized<c10::BFloat16>::size();
  static constexpr int kVecs = static_cast<int>(kSize / V::size());
  V v[kVecs];

  void load(const T* p) {
    for (int k = 0; k < kVecs; ++k) v[k] = V::loadu(p + k * V::size());
  }
  void load(const T* p, int64_t n) {
    if (n == kSize) return load(p);
    for (int k = 0; k < kVecs; ++k) {
      const int64_t m = std::clamp<int64_t>(n - k * V::size(), 0, V::size());
      v[k] = m > 0 ? V::loadu(p + k * V::size(), m) : V(A(0));
    }
  }
  void store(T* p) const {
    for (int k = 0; k < kVecs; ++k) v[k].store(p + k * V::size());
  }
  void store(T* p, int64_t n) const {
    if (n == kSize) return store(p);
    for (int k = 0; k < kVecs; ++k) {
      const int64_t m = std::clamp<int64_t>(n - k * V::size(), 0, V::size());
      if (m > 0) v[k].store(p + k * V::size(), static_cast<int>(m));
    }
  }
};

template <>
inline void Chunk<c10::BFloat16>::load(const c10::BFloat16* p) {
  std::tie(v[0], v[1]) = at::vec::convert_to_float<c10::BFloat16>(at::vec::Vectorized<c10::BFloat16>::loadu(p));
}
template <>
inline void Chunk<c10::BFloat16>::load(const c10::BFloat16* p, int64_t n) {
  if (n == kSize) return load(p);
  std::tie(v[0], v[1]) = at::vec::convert_to_float<c10::BFloat16>(
      at::vec::Vectorized<c10::BFloat16>::loadu(p, static_cast<int16_t>(n)));
}
template <>
inline void Chunk<c10::BFloat16>::store(c10::BFloat16* p) const {
  at::vec::convert_from_float<c10::BFloat16>(v[0], v[1]).store(p);
}
template <>
inline void Chunk<c10::BFloat16>::store(c10::BFloat16* p, int64_t n) const {
  if (n == kSize) return store(p);
  at::vec::convert_from_float<c10::BFloat16>(v[0], v[1]).store(p, static_cast<int>(n));
}

// f(i, n) over [i0, i1) in chunks: n == kSize for every whole chunk (a constant once f is inlined, so the
// loop carries no count), then once with the n < kSize values left.
template <typename T, typename F>
inline void for_chunks(int64_t i0, int64_t i1, const F& f) {
  constexpr int64_t step = Chunk<T>::kSize;
  int64_t i = i0;
  for (; i + step <= i1; i += step) f(i, step);
  if (i < i1) f(i, i1 - i);
}

// The lanes of kVecs accumulator vectors added in a fixed order (lane by lane), in double.
template <typename V, int N>
inline double ordered_lanes(const V (&acc)[N]) {
  using A = typename V::value_type;
  A lanes[N * V::size()];
  for (int k = 0; k < N; ++k) acc[k].store(lanes + k * V::size());
  double s = 0;
  for (A x : lanes) s += static_cast<double>(x);
  return s;
}

// ---- transcendental functions over a block, through ATen's Vectorized (Sleef u10) --------------------
template <typename A, typename F>
inline void vmap(const A* x, A* y, int64_t n, F f) {
  using V = at::vec::Vectorized<A>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) f(V::loadu(x + i)).store(y + i);
  if (i < n) f(V::loadu(x + i, n - i)).store(y + i, n - i);
}
template <typename A>
inline void vexp(const A* x, A* y, int64_t n) { vmap(x, y, n, [](auto v) { return v.exp(); }); }
template <typename A>
inline void vlog1p(const A* x, A* y, int64_t n) { vmap(x, y, n, [](auto v) { return v.log1p(); }); }
template <typename A>
inline void vtanh(const A* x, A* y, int64_t n) { vmap(x, y, n, [](auto v) { return v.tanh(); }); }

// ---- deterministic sums ------------------------------------------------------------------------------
// Sum of n values with 16 independent lanes (a loop gcc vectorises), lanes added in a fixed order.
template <typename A>
inline A lane_sum(const A* x, int64_t n) {
  constexpr int L = 16;
  A lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) lanes[l] += x[i + l];
  for (int l = 0; i < n; ++i, ++l) lanes[l] += x[i];
  A s = 0;
  for (int l = 0; l < L; ++l) s += lanes[l];
  return s;
}

// Run f(task) for task in [0, ntasks), in parallel when there is more than one task.
// Task lambdas capture by reference, and under -fno-strict-aliasing a store through an output pointer may
// alias any captured variable: a scalar read inside a loop that stores would be reloaded every element and
// the loop left scalar. Copy captured scalars into locals at the top of the task.
template <typename F>
inline void for_tasks(int64_t ntasks, const F& f) {
  if (ntasks <= 1) {
    if (ntasks == 1) f(0);
    return;
  }
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t);
  });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- calling the library's ops from their autograd formulas -----------------------------------------
// The forward and backward formulas call the kernels through the dispatcher (so that fake tensors reach the
// fake kernels), below autograd: without at::AutoDispatchBelowADInplaceOrView a backward op, which has no
// Autograd kernel, goes through torch's boxed "autograd not implemented" fallback, which cost about as much
// as the whole kernel on a small tensor (~20k instructions a call, measured with callgrind).
//   static const auto op = library_op<decltype(scale_grad)>("scale_grad");   // looked up once per site
//   auto [out, neg] = call_below_autograd(op, stored, g, false);
template <typename Fn>
c10::TypedOperatorHandle<Fn> library_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("vaegan_fast_native::") + name).c_str(), "")
      .typed<Fn>();
}

template <typename Fn, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Fn>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// ---- the matrix products (products.cpp) -------------------------------------------------------------
// a @ b and bias + a @ b (bias [N] broadcast over the rows): every GEMM of the native ops. fp32 products run on
// torch's BLAS or, on the "onednn" path, the large ones on oneDNN's matmul; bf16 and fp64 ones on at::mm.
at::Tensor product_mm(const at::Tensor& a, const at::Tensor& b);
at::Tensor product_addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);

// A product of more multiply-adds than this runs alone on every thread (smaller ones may run side by side, one
// thread each), and is where oneDNN's per-call overhead no longer outweighs its faster kernel here: the default
// smallest product of the "onednn" fp32 path.
constexpr int64_t kLargeProductMacs = int64_t(1) << 24;

// True: a bf16 op forms its products (product_mm / product_addmm / at::convolution) on its bf16 operands
// (oneDNN's bf16 kernels, fp32 accumulation, the output rounded to bf16 once); false: the operands are upcast
// and the product runs in fp32. Set from Python once at load time (vaegan_fast/ops/_native_lib.py: bf16 units
// on the CPU, or VAEGAN_FAST_BF16_PRODUCTS).
bool bf16_products();

// The dtype a product of operands in `dtype` runs in.
inline at::ScalarType product_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && !bf16_products() ? at::kFloat : dtype;
}

// The configuration ops' functions (library.cpp registers them): each returns the previous setting.
bool set_bf16_products(bool enabled);
// fp32 products of at least min_macs multiply-adds go to oneDNN; a negative min_macs keeps them all on BLAS.
int64_t set_onednn_min_macs(int64_t min_macs);
std::string onednn_matmul_problem();  // "" where oneDNN's fp32 matmul runs here

// ---- dtype rules -------------------------------------------------------------------------------------
inline void check_dtype(const at::Tensor& t, const char* op, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble, "vaegan_fast native ",
                   op, ": ", name, " has dtype ", dt,
                   "; the native CPU backend supports float32, bfloat16 and float64 (float16 is not "
                   "supported on the CPU: use bfloat16 or float32)");
  TORCH_CHECK(t.device().is_cpu(), "vaegan_fast native ", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
}

}  // namespace vaegan_fast_native

// Dispatch on float / bfloat16 / double with scalar_t bound inside the lambda.
#define VFN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)
