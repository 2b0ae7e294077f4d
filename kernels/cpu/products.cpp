// The matrix products of the native ops (common.h: product_mm, product_addmm) and the two settings that pick how
// they are formed. Python sets both once at load time (vaegan_fast/ops/_native_lib.py, which says why) through
// the configuration ops in library.cpp.
//
//   bf16 operands   on them (oneDNN's bf16 kernels, fp32 accumulation) when bf16_products(), else upcast to fp32
//   fp32 operands   "blas":   at::mm / at::addmm, torch's BLAS (MKL in torch's x86-64 wheels)
//                   "onednn": oneDNN's matmul (at::native::mkldnn_matmul, what ATen itself calls for bf16 mm) for
//                             products of at least set_onednn_min_macs()'s multiply-adds (from Python: more than
//                             kLargeProductMacs), BLAS for smaller ones
//   fp64 operands   at::mm
//
// Why two fp32 paths: MKL keeps its fastest kernels for Intel CPUs, and on an AMD Zen 4 oneDNN's fp32 matmul ran
// the large products 7-80% (most about 25%) faster, while spending ~20 us more per call (docs/performance.md).
// Both paths are deterministic for a given shape and thread count; their bits differ.
#include "common.h"

#include <atomic>
#include <string>

#include <ATen/record_function.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

// oneDNN's fp32/bf16 matmul inside libtorch_cpu: exported, but declared only in an ATen header torch does not
// install. Weak, so that a torch without it (or with another signature) loads the library with this null and the
// "onednn" path unavailable rather than failing to load (onednn_matmul_problem()).
namespace at::native {
void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                   float alpha) __attribute__((weak));
}  // namespace at::native

namespace vaegan_fast_native {
namespace {
constexpr const char* kOneDnnEvent = "products::onednn_matmul";  // bench/profile_step.py counts it as a product
std::atomic<bool> g_bf16_products{false};
// The smallest fp32 product (in multiply-adds) that goes to oneDNN; -1: none (the "blas" path, the default until
// Python sets it).
std::atomic<int64_t> g_onednn_min_macs{-1};

bool on_onednn(const at::Tensor& a, const at::Tensor& b) {
  const int64_t min_macs = g_onednn_min_macs.load(std::memory_order_relaxed);
  return min_macs >= 0 && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
         a.size(0) * a.size(1) * b.size(1) >= min_macs && a.numel() > 0 && b.numel() > 0;
}
}  // namespace

bool bf16_products() { return g_bf16_products.load(std::memory_order_relaxed); }
bool set_bf16_products(bool enabled) { return g_bf16_products.exchange(enabled); }
std::string onednn_matmul_problem() {
  // Tried once on a 1x1 product: torch refuses oneDNN's matmul, fp32 included, where oneDNN may not use AVX-512
  // (an AVX2-only CPU, or ONEDNN_MAX_CPU_ISA=AVX2), and oneDNN fixes its ISA at its first primitive anyway.
  static const std::string problem = []() -> std::string {
    if (&at::native::mkldnn_matmul == nullptr) {
      return "this torch does not export oneDNN's matmul (at::native::mkldnn_matmul)";
    }
    try {
      const at::Tensor one = at::ones({1, 1});
      at::native::mkldnn_matmul(one, one, at::empty({1, 1}), /*beta=*/0.f, /*alpha=*/1.f);
      return "";
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      return "oneDNN's matmul refuses fp32 products on this CPU (" + what.substr(0, what.find('\n')) + ")";
    }
  }();
  return problem;
}

int64_t set_onednn_min_macs(int64_t min_macs) {
  TORCH_CHECK(min_macs < 0 || onednn_matmul_problem().empty(), "vaegan_fast native: ", onednn_matmul_problem(),
              "; use the \"blas\" fp32 product path");
  return g_onednn_min_macs.exchange(min_macs < 0 ? -1 : min_macs);
}

at::Tensor product_mm(const at::Tensor& a, const at::Tensor& b) {
  if (!on_onednn(a, b)) return at::mm(a, b);
  RECORD_FUNCTION(kOneDnnEvent, std::vector<c10::IValue>({a, b}));  // below the dispatcher: the profiler's only sign
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  at::native::mkldnn_matmul(a, b, out, /*beta=*/0.f, /*alpha=*/1.f);
  return out;
}

at::Tensor product_addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (!on_onednn(a, b)) return at::addmm(bias, a, b);
  RECORD_FUNCTION(kOneDnnEvent, std::vector<c10::IValue>({bias, a, b}));
  // beta = 1: oneDNN adds the product to the bias rows as it stores it (a sum post-op), as BLAS's beta does
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  out.copy_(bias.expand_as(out));
  at::native::mkldnn_matmul(a, b, out, /*beta=*/1.f, /*alpha=*/1.f);
  return out;
}
}  // namespace vaegan_fast_native
