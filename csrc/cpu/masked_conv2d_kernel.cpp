// CPU kernels of masked_conv2d: ATen's convolution plus a fused epilogue (score, residual,
// activation, gate blend) and a fused backward epilogue (grad_z, grad_residual, per-filter
// grad_scale, grad_gate_logit). Host steps are shared with CUDA (common/masked_conv2d_host.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/masked_conv2d_host.h"
#include "cpu/loops.h"
#include "math/epilogue.h"

namespace nchains {
namespace cpu {
namespace {

// Pointers of one epilogue call; r and x are null when the flags say they are absent.
template <typename scalar_t>
struct Ptrs {
  const scalar_t* z;
  const scalar_t* s;
  const scalar_t* r;
  const scalar_t* x;
};

// The element loops, as functions of __restrict__ pointers and plain values: GCC vectorises
// them as such, while the same loops inlined into lambdas that capture by reference stayed
// scalar, with a mispredicted ReLU branch per element (~6x slower when gated). r and x are read
// only when RES / GATED. One "plane" is one channel's contiguous map (score sc); "rows" are
// channels_last pixels of C channels each (scores s[0, C)).
#define NC_NOINLINE __attribute__((noinline))

template <typename scalar_t, bool RELU, bool GATED, bool RES>
NC_NOINLINE void forward_plane(int64_t len, const scalar_t* __restrict__ z, scalar_t sc,
                               const scalar_t* __restrict__ r, const scalar_t* __restrict__ x, scalar_t g,
                               scalar_t* __restrict__ out) {
NC_PRAGMA(omp simd)
  for (int64_t i = 0; i < len; ++i)
    out[i] = math::epilogue_forward<RELU, GATED, RES>(z[i], sc, RES ? r[i] : scalar_t(0), GATED ? x[i] : scalar_t(0), g);
}

template <typename scalar_t, bool RELU, bool GATED, bool RES>
NC_NOINLINE void forward_rows(int64_t rows, int64_t c_n, const scalar_t* __restrict__ z,
                              const scalar_t* __restrict__ s, const scalar_t* __restrict__ r,
                              const scalar_t* __restrict__ x, scalar_t g, scalar_t* __restrict__ out) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t off = row * c_n;
NC_PRAGMA(omp simd)
    for (int64_t c = 0; c < c_n; ++c)
      out[off + c] = math::epilogue_forward<RELU, GATED, RES>(z[off + c], s[c], RES ? r[off + c] : scalar_t(0),
                                                              GATED ? x[off + c] : scalar_t(0), g);
  }
}

// Fills acc[0] = sum of dL/ds and acc[1] = sum of dL/dG over the plane. The residual's gradient
// is gu + direct * grad_out (direct = 1 - G when the residual is also what the gate blends with).
template <typename scalar_t, bool RELU, bool GATED, bool RES>
NC_NOINLINE void backward_plane(int64_t len, const scalar_t* __restrict__ go, const scalar_t* __restrict__ z,
                                scalar_t sc, const scalar_t* __restrict__ r, const scalar_t* __restrict__ x,
                                scalar_t g, scalar_t direct, scalar_t* __restrict__ gz, scalar_t* __restrict__ gr,
                                double* __restrict__ acc) {
  double acc_s = 0.0, acc_g = 0.0;
NC_PRAGMA(omp simd reduction(+ : acc_s, acc_g))
  for (int64_t i = 0; i < len; ++i) {
    scalar_t gu;
    gz[i] = math::epilogue_backward<RELU, GATED, RES>(go[i], z[i], sc, RES ? r[i] : scalar_t(0),
                                                      GATED ? x[i] : scalar_t(0), g, gu, acc_s, acc_g);
    if constexpr (RES) gr[i] = gu + direct * go[i];
  }
  acc[0] = acc_s;
  acc[1] = acc_g;
}

// Adds each channel's dL/ds to acc[0, C) and dL/dG to acc[C].
template <typename scalar_t, bool RELU, bool GATED, bool RES>
NC_NOINLINE void backward_rows(int64_t rows, int64_t c_n, const scalar_t* __restrict__ go,
                               const scalar_t* __restrict__ z, const scalar_t* __restrict__ s,
                               const scalar_t* __restrict__ r, const scalar_t* __restrict__ x, scalar_t g,
                               scalar_t direct, scalar_t* __restrict__ gz, scalar_t* __restrict__ gr,
                               double* __restrict__ acc) {
  double acc_g = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t off = row * c_n;
NC_PRAGMA(omp simd reduction(+ : acc_g))
    for (int64_t c = 0; c < c_n; ++c) {
      scalar_t gu;
      gz[off + c] = math::epilogue_backward<RELU, GATED, RES>(go[off + c], z[off + c], s[c],
                                                              RES ? r[off + c] : scalar_t(0),
                                                              GATED ? x[off + c] : scalar_t(0), g, gu, acc[c], acc_g);
      if constexpr (RES) gr[off + c] = gu + direct * go[off + c];
    }
  }
  acc[c_n] += acc_g;
}

template <typename scalar_t>
const scalar_t* offset(const scalar_t* p, int64_t off) {
  return p == nullptr ? nullptr : p + off;
}

template <typename scalar_t>
scalar_t* offset(scalar_t* p, int64_t off) {
  return p == nullptr ? nullptr : p + off;
}

template <typename scalar_t, bool RELU, bool GATED, bool RES>
void epilogue_forward(const Ptrs<scalar_t>& p, scalar_t g, scalar_t* out, const ChannelView& v) {
  if (!v.channels_last) {
    parallel_planes(v.n * v.c, v.s, [&](int64_t plane) {
      const int64_t off = plane * v.s;
      forward_plane<scalar_t, RELU, GATED, RES>(v.s, p.z + off, p.s[plane % v.c], offset(p.r, off), offset(p.x, off),
                                                g, out + off);
    });
    return;
  }
  const int64_t c_n = v.c;
  at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, kGrain / c_n), [&](int64_t begin, int64_t end) {
    const int64_t off = begin * c_n;
    forward_rows<scalar_t, RELU, GATED, RES>(end - begin, c_n, p.z + off, p.s, offset(p.r, off), offset(p.x, off), g,
                                             out + off);
  });
}

// Writes grad_z (and grad_residual when RES); returns dL/dG and fills grad_s[C] (double accumulation).
template <typename scalar_t, bool RELU, bool GATED, bool RES>
double epilogue_backward(const scalar_t* go, const Ptrs<scalar_t>& p, scalar_t g, scalar_t direct, scalar_t* gz,
                         scalar_t* gr, double* grad_s, const ChannelView& v) {
  double grad_g = 0.0;
  if (!v.channels_last) {
    std::vector<double> part(static_cast<size_t>(2 * v.n * v.c));
    parallel_planes(v.n * v.c, v.s, [&](int64_t plane) {
      const int64_t off = plane * v.s;
      backward_plane<scalar_t, RELU, GATED, RES>(v.s, go + off, p.z + off, p.s[plane % v.c], offset(p.r, off),
                                                 offset(p.x, off), g, direct, gz + off, offset(gr, off),
                                                 part.data() + 2 * plane);
    });
    for (int64_t plane = 0; plane < v.n * v.c; ++plane) {
      grad_s[plane % v.c] += part[2 * plane];
      grad_g += part[2 * plane + 1];
    }
    return grad_g;
  }
  // channels_last: each chunk accumulates grad_s in acc[0, C) and grad_g in acc[C].
  int64_t pieces = 0;
  const int64_t c_n = v.c;
  auto partial = channels_last_reduce(v, c_n + 1, pieces, [&](int64_t n, int64_t r0, int64_t r1, double* acc) {
    const int64_t off = (n * v.s + r0) * c_n;
    backward_rows<scalar_t, RELU, GATED, RES>(r1 - r0, c_n, go + off, p.z + off, p.s, offset(p.r, off),
                                              offset(p.x, off), g, direct, gz + off, offset(gr, off), acc);
  });
  for (int64_t t = 0; t < v.n * pieces; ++t) {
    const double* acc = partial.data() + t * (c_n + 1);
    for (int64_t c = 0; c < c_n; ++c) grad_s[c] += acc[c];
    grad_g += acc[c_n];
  }
  return grad_g;
}

template <typename scalar_t>
scalar_t gate_of(const std::optional<at::Tensor>& gate_logit, double temperature) {
  return defined(gate_logit) ? math::gate_value<scalar_t>(gate_logit->item<scalar_t>(), scalar_t(temperature))
                             : scalar_t(1);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit, double temperature,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate_input) {
  ForwardPlan p = plan_forward(input, weight, bias, scale, stride, padding, dilation, groups, activation, gate_logit,
                               temperature, residual, gate_input);
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "masked_conv2d_cpu", [&] {
    const scalar_t g = gate_of<scalar_t>(gate_logit, temperature);
    const Ptrs<scalar_t> ptrs{p.z.const_data_ptr<scalar_t>(), p.s.const_data_ptr<scalar_t>(),
                              data_or_null<scalar_t>(p.r), data_or_null<scalar_t>(p.x)};
    dispatch_flags(p.relu, p.gated, p.res, [&]<bool RELU, bool GATED, bool RES>() {
      epilogue_forward<scalar_t, RELU, GATED, RES>(ptrs, g, p.out.mutable_data_ptr<scalar_t>(), p.v);
    });
  });
  return {p.out, p.z};
}

at::Tensor masked_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                             const std::optional<at::Tensor>& gate_logit, double temperature,
                             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate_input) {
  return std::get<0>(masked_conv2d_forward_cpu(input, weight, bias, scale, stride, padding, dilation, groups,
                                               activation, gate_logit, temperature, residual, gate_input));
}

MaskedConvGrads masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit, double temperature,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate_input,
    std::array<bool, 3> conv_mask) {
  BackwardPlan p = plan_backward(grad_out, input, weight, z, scale, activation, gate_logit, residual, gate_input);
  std::vector<double> grad_s(static_cast<size_t>(p.v.c), 0.0);
  double grad_g = 0.0;
  double g_value = 1.0;
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "masked_conv2d_backward_cpu", [&] {
    const scalar_t g = gate_of<scalar_t>(gate_logit, temperature);
    g_value = static_cast<double>(g);
    const Ptrs<scalar_t> ptrs{p.z.const_data_ptr<scalar_t>(), p.s.const_data_ptr<scalar_t>(),
                              data_or_null<scalar_t>(p.r), data_or_null<scalar_t>(p.x)};
    scalar_t* gr = p.res ? p.gr.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_flags(p.relu, p.gated, p.res, [&]<bool RELU, bool GATED, bool RES>() {
      const scalar_t direct = p.shared ? scalar_t(1) - g : scalar_t(0);
      grad_g = epilogue_backward<scalar_t, RELU, GATED, RES>(p.go.const_data_ptr<scalar_t>(), ptrs, g, direct,
                                                             p.gz.mutable_data_ptr<scalar_t>(), gr, grad_s.data(),
                                                             p.v);
    });
  });
  at::Tensor grad_scale = at::tensor(grad_s, at::TensorOptions().dtype(at::kDouble)).to(scale.scalar_type());
  at::Tensor grad_gate = p.gated ? at::scalar_tensor(grad_g * g_value * (1.0 - g_value) / temperature,
                                                     gate_logit->options())
                                 : at::empty({0}, input.options());
  auto [grad_input, grad_weight, grad_bias] = conv_grads(p, input, weight, stride, padding, dilation, groups, conv_mask);
  // The gate's direct path (1 - G) * grad_out goes to what the gate blends with.
  at::Tensor grad_gate_input = at::empty({0}, input.options());
  if (p.gated && p.own_gate_input && conv_mask[0]) grad_input.add_(p.go, 1.0 - g_value);
  if (p.gated && !p.own_gate_input && !p.shared) grad_gate_input = p.go.mul(1.0 - g_value);
  at::Tensor grad_residual = p.res ? p.gr : at::empty({0}, input.options());
  return {grad_input, grad_weight, grad_bias, grad_scale, grad_gate, grad_residual, grad_gate_input};
}

}  // namespace
}  // namespace cpu
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CPU, m) {
  m.impl("masked_conv2d", &nchains::cpu::masked_conv2d_cpu);
  m.impl("_masked_conv2d", &nchains::cpu::masked_conv2d_forward_cpu);
  m.impl("_masked_conv2d_backward", &nchains::cpu::masked_conv2d_backward_cpu);
}
