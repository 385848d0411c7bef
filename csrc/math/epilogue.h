// Element math of the fused ops, shared by the CPU loops and the CUDA kernels.
//
// Forward of masked_conv2d's epilogue and of gate:
//   u = s * z (+ r);  y = act(u);  out = gated ? G * y + (1 - G) * x : y
// r is the optional residual (a residual add fused before the activation); x is what the gate
// blends with (the conv's input for a layer gate, the block's input for a fused block gate).
// Backward, per element, given go = dL/dout:
//   gy = gated ? G * go : go
//   gu = relu ? (u > 0 ? gy : 0) : gy        (torch.relu's convention at u == 0)
//   gz = gu * s          -> grad of the conv output
//   gu                   -> grad of the residual r
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

template <bool RELU, bool GATED, bool RES, typename T>
NC_HD T epilogue_forward(T z, T s, T r, T x, T g) {
  T u = s * z;
  if constexpr (RES) u += r;
  T y = act<RELU>(u);
  if constexpr (GATED) {
    return blend(y, x, g);
  } else {
    return y;
  }
}

// Returns grad_z and sets gu (the grad of u, which is the residual's); adds this element's
// share of dL/ds and dL/dG to the accumulators.
template <bool RELU, bool GATED, bool RES, typename T, typename AccS, typename AccG>
NC_HD T epilogue_backward(T go, T z, T s, T r, T x, T g, T& gu, AccS& acc_s, AccG& acc_g) {
  T u = s * z;
  if constexpr (RES) u += r;
  // One comparison feeds both selects (ReLU's output and its gradient): GCC if-converts
  // (vectorises) the loop only in this form when the gate needs the output too.
  const bool pass = RELU ? u > T(0) : true;
  const T gy = GATED ? g * go : go;
  gu = pass ? gy : T(0);
  acc_s += static_cast<AccS>(gu * z);
  if constexpr (GATED) {
    acc_g += static_cast<AccG>(go * ((pass ? u : T(0)) - x));
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
