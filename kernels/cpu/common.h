// Shared pieces of the native CPU kernels (reparam_kl.cpp, gan_losses.cpp, linear_act.cpp).
//
// Every kernel works the same way: the tensor is cut into fixed-size tasks (kTask elements, or whole rows
// adding up to about kTask elements), tasks run in parallel under at::parallel_for, and inside a task the
// data goes through small fp32 (fp64 for double inputs) scratch blocks of kBlock elements that stay in L1:
//   load (bf16 -> fp32 conversion; fp32/fp64 inputs are used in place), plain loops over the block (gcc
//   auto-vectorises them: build with -DVAEGAN_FAST_VEC_REPORT=ON to see -fopt-info-vec), exp/log1p/tanh
//   through ATen's Vectorized (Sleef, 1-ulp), store (fp32 -> bf16 with round-to-nearest-even).
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
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
