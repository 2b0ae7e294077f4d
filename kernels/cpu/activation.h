// The fused layers' activations on the CPU: codes, act(.) and g * act'(.) on ATen vectors, and a switch that
// fixes the activation at compile time. The codes are the indices of vaegan_fast/ops/activations.py's table (its
// specification, with the formulas); tests/test_activations.py checks that they agree.
//   gelu(a) = 0.5 a (1 + tanh(k0 (a + k1 a^3))),  k0 = sqrt(2/pi), k1 = 0.044715
//   gelu'(a) = 0.5 (1 + th) + 0.5 a (1 - th^2) k0 (1 + 3 k1 a^2),  th = tanh(k0 (a + k1 a^3))
// act'(.) is formed from y where that is exact (relu, leaky_relu with a slope > 0, tanh, sigmoid), else from the
// pre-activation (gelu, leaky_relu with a slope <= 0): keeps_preactivation.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace vaegan_fast_native {

enum Act : int64_t { kIdentity = 0, kRelu = 1, kLeaky = 2, kTanh = 3, kSigmoid = 4, kGelu = 5 };

inline bool keeps_preactivation(int64_t act, double slope) {
  return act == kGelu || (act == kLeaky && slope <= 0.0);
}

template <typename A>
struct GeluConst {
  static constexpr A k0 = A(0.7978845608028654);  // sqrt(2 / pi)
  static constexpr A k1 = A(0.044715);
};

// act(w) for one vector of pre-activations; slope is leaky_relu's negative slope.
template <int64_t Act, typename V>
inline V activate(const V& w, const V& slope) {
  using A = typename V::value_type;
  const V zero(A(0)), one(A(1));
  if constexpr (Act == kIdentity) {
    return w;
  } else if constexpr (Act == kRelu) {
    return at::vec::maximum(w, zero);
  } else if constexpr (Act == kLeaky) {
    return at::vec::maximum(w, zero) + slope * at::vec::minimum(w, zero);
  } else if constexpr (Act == kTanh) {
    return w.tanh();
  } else if constexpr (Act == kSigmoid) {
    return one / (one + w.neg().exp());
  } else {  // gelu, tanh form
    const V k0(GeluConst<A>::k0), k1(GeluConst<A>::k1);
    return V(A(0.5)) * w * (one + (k0 * (w + k1 * w * w * w)).tanh());
  }
}

// g * act'(.) for one vector, s being y or the pre-activation (see the header).
template <int64_t Act, typename V>
inline V derivative(const V& g, const V& s, const V& slope) {
  using A = typename V::value_type;
  const V zero(A(0)), one(A(1));
  if constexpr (Act == kIdentity) {
    return g;
  } else if constexpr (Act == kRelu) {
    return V::blendv(zero, g, s > zero);
  } else if constexpr (Act == kLeaky) {
    return V::blendv(slope * g, g, s > zero);
  } else if constexpr (Act == kTanh) {
    return g * (one - s * s);
  } else if constexpr (Act == kSigmoid) {
    return g * ((one - s) * s);
  } else {  // gelu, tanh form
    const V k0(GeluConst<A>::k0), k1(GeluConst<A>::k1), half(A(0.5));
    const V th = (k0 * (s + k1 * s * s * s)).tanh();
    const V left = half * (one + th);
    const V right = half * s * (one - th * th) * k0 * (one + V(A(3)) * k1 * s * s);
    return g * (left + right);
  }
}

// f(std::integral_constant<int64_t, act>): the kernels below with the activation fixed at compile time, so
// that no per-row or per-element switch runs.
template <typename F>
void with_activation(int64_t act, const F& f) {
  switch (act) {
    case kIdentity: return f(std::integral_constant<int64_t, kIdentity>{});
    case kRelu: return f(std::integral_constant<int64_t, kRelu>{});
    case kLeaky: return f(std::integral_constant<int64_t, kLeaky>{});
    case kTanh: return f(std::integral_constant<int64_t, kTanh>{});
    case kSigmoid: return f(std::integral_constant<int64_t, kSigmoid>{});
    default: return f(std::integral_constant<int64_t, kGelu>{});
  }
}

}  // namespace vaegan_fast_native
