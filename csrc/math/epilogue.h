// Element math of the fused ops, shared by the CPU loops and the CUDA kernels.
//
// Forward of masked_conv2d's epilogue and of gate:
//   u = s * z;  y = act(u);  out = gated ? G * y + (1 - G) * x : y
// Backward, per element, given go = dL/dout:
//   gy = gated ? G * go : go
//   gu = relu ? (u > 0 ? gy : 0) : gy        (torch.relu's convention at u == 0)
//   gz = gu * s          -> grad of the conv output
//   gu * z               -> summed per channel: grad of the score s
//   go * (y - x)         -> summed over everything: dL/dG (times G(1-G)/T gives dL/dalpha)
#pragma once

#include <cmath>

#include "common/hd.h"

namespace nchains {
namespace math {

template <typename T>
NC_HD T relu(T u) {
  return u > T(0) ? u : T(0);
}

template <bool RELU, typename T>
NC_HD T act(T u) {
  if constexpr (RELU) {
    return relu(u);
  } else {
    return u;
  }
}

template <typename T>
NC_HD T blend(T y, T x, T g) {
  return g * y + (T(1) - g) * x;
}

template <bool RELU, bool GATED, typename T>
NC_HD T epilogue_forward(T z, T s, T x, T g) {
  T y = act<RELU>(s * z);
  if constexpr (GATED) {
    return blend(y, x, g);
  } else {
    return y;
  }
}

// Returns grad_z; adds this element's share of dL/ds and dL/dG to the accumulators.
template <bool RELU, bool GATED, typename T, typename Acc>
NC_HD T epilogue_backward(T go, T z, T s, T x, T g, Acc& acc_s, Acc& acc_g) {
  T u = s * z;
  T gy = GATED ? g * go : go;
  T gu;
  if constexpr (RELU) {
    gu = u > T(0) ? gy : T(0);
  } else {
    gu = gy;
  }
  acc_s += static_cast<Acc>(gu * z);
  if constexpr (GATED) {
    acc_g += static_cast<Acc>(go * (act<RELU>(u) - x));
  }
  return gu * s;
}

// dG/dalpha for G = sigmoid(alpha / T).
template <typename T>
NC_HD T gate_value(T alpha, T temperature) {
#if defined(__CUDACC__) || defined(__HIPCC__)
  return T(1) / (T(1) + exp(-alpha / temperature));
#else
  return T(1) / (T(1) + std::exp(-alpha / temperature));
#endif
}

template <typename T>
NC_HD T gate_dvalue(T g, T temperature) {
  return g * (T(1) - g) / temperature;
}

// Taylor contribution of one neuron: a * g, or |a * g|.
template <bool ABS, typename T>
NC_HD T taylor(T a, T g) {
  T p = a * g;
  if constexpr (ABS) {
    return p < T(0) ? -p : p;
  } else {
    return p;
  }
}

// d taylor / d a given the upstream gradient go (torch.abs convention: sign(0) = 0).
template <bool ABS, typename T>
NC_HD T taylor_dfirst(T go, T a, T g) {
  if constexpr (ABS) {
    T p = a * g;
    T sgn = p > T(0) ? T(1) : (p < T(0) ? T(-1) : T(0));
    return go * sgn * g;
  } else {
    return go * g;
  }
}

}  // namespace math
}  // namespace nchains
