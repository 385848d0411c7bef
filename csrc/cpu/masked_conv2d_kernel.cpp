// CPU kernels of masked_conv2d: ATen's convolution plus a fused epilogue (score, activation,
// gate blend) and a fused backward epilogue (grad_z, per-filter grad_scale, grad_gate_logit).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/loops.h"
#include "math/epilogue.h"

namespace nchains {
namespace cpu {
namespace {

template <typename scalar_t, bool RELU, bool GATED>
void epilogue_forward(const scalar_t* z, const scalar_t* s, const scalar_t* x, scalar_t g, scalar_t* out,
                      const ChannelView& v) {
  if (!v.channels_last) {
    parallel_planes(v.n * v.c, v.s, [&](int64_t p) {
      const scalar_t sc = s[p % v.c];
      const int64_t off = p * v.s;
      const scalar_t* zp = z + off;
      const scalar_t* xp = GATED ? x + off : zp;
      scalar_t* op = out + off;
NC_PRAGMA(omp simd)
      for (int64_t i = 0; i < v.s; ++i) op[i] = math::epilogue_forward<RELU, GATED>(zp[i], sc, xp[i], g);
    });
    return;
  }
  const int64_t c_n = v.c;
  at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, kGrain / c_n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * c_n;
      const scalar_t* zp = z + off;
      const scalar_t* xp = GATED ? x + off : zp;
      scalar_t* op = out + off;
NC_PRAGMA(omp simd)
      for (int64_t c = 0; c < c_n; ++c) op[c] = math::epilogue_forward<RELU, GATED>(zp[c], s[c], xp[c], g);
    }
  });
}

// Writes grad_z; returns dL/dG and fills grad_s[C] (double accumulation).
template <typename scalar_t, bool RELU, bool GATED>
double epilogue_backward(const scalar_t* go, const scalar_t* z, const scalar_t* s, const scalar_t* x, scalar_t g,
                         scalar_t* gz, double* grad_s, const ChannelView& v) {
  double grad_g = 0.0;
  if (!v.channels_last) {
    std::vector<double> part_s(static_cast<size_t>(v.n * v.c)), part_g(static_cast<size_t>(v.n * v.c));
    parallel_planes(v.n * v.c, v.s, [&](int64_t p) {
      const scalar_t sc = s[p % v.c];
      const int64_t off = p * v.s;
      const scalar_t* gop = go + off;
      const scalar_t* zp = z + off;
      const scalar_t* xp = GATED ? x + off : zp;
      scalar_t* gzp = gz + off;
      double acc_s = 0.0, acc_g = 0.0;
NC_PRAGMA(omp simd reduction(+ : acc_s, acc_g))
      for (int64_t i = 0; i < v.s; ++i)
        gzp[i] = math::epilogue_backward<RELU, GATED>(gop[i], zp[i], sc, xp[i], g, acc_s, acc_g);
      part_s[p] = acc_s;
      part_g[p] = acc_g;
    });
    for (int64_t p = 0; p < v.n * v.c; ++p) {
      grad_s[p % v.c] += part_s[p];
      grad_g += part_g[p];
    }
    return grad_g;
  }
  // channels_last: each chunk accumulates grad_s in acc[0, C) and grad_g in acc[C].
  int64_t pieces = 0;
  const int64_t c_n = v.c;
  auto partial = channels_last_reduce(v, c_n + 1, pieces, [&](int64_t n, int64_t r0, int64_t r1, double* acc) {
    double acc_g = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = (n * v.s + r) * c_n;
      const scalar_t* gop = go + off;
      const scalar_t* zp = z + off;
      const scalar_t* xp = GATED ? x + off : zp;
      scalar_t* gzp = gz + off;
NC_PRAGMA(omp simd reduction(+ : acc_g))
      for (int64_t c = 0; c < c_n; ++c)
        gzp[c] = math::epilogue_backward<RELU, GATED>(gop[c], zp[c], s[c], xp[c], g, acc[c], acc_g);
    }
    acc[c_n] = acc_g;
  });
  for (int64_t t = 0; t < v.n * pieces; ++t) {
    const double* acc = partial.data() + t * (c_n + 1);
    for (int64_t c = 0; c < c_n; ++c) grad_s[c] += acc[c];
    grad_g += acc[c_n];
  }
  return grad_g;
}

// Runs fn.template operator()<RELU, GATED>() for the runtime flags.
template <typename F>
void dispatch_flags(bool relu, bool gated, const F& fn) {
  if (relu) {
    gated ? fn.template operator()<true, true>() : fn.template operator()<true, false>();
  } else {
    gated ? fn.template operator()<false, true>() : fn.template operator()<false, false>();
  }
}

at::MemoryFormat conv_layout(const at::Tensor& input, const at::Tensor& weight) {
  return (is_channels_last(input) || is_channels_last(weight)) ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit,
    double temperature) {
  check_masked_conv2d(input, weight, bias, scale, stride, padding, dilation, groups, gate_logit, temperature);
  const bool relu = parse_activation(std::string(activation));
  const bool gated = gate_logit.has_value() && gate_logit->defined();
  const auto fmt = conv_layout(input, weight);
  at::Tensor z = canonical(
      at::convolution(input, weight, bias, stride, padding, dilation, false, {0, 0}, groups), fmt);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(fmt));
  at::Tensor s = scale.contiguous();
  at::Tensor x = gated ? input.contiguous(fmt) : at::Tensor();
  const ChannelView v = channel_view(z, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "masked_conv2d_cpu", [&] {
    const scalar_t g = gated ? math::gate_value<scalar_t>(gate_logit->item<scalar_t>(), scalar_t(temperature))
                             : scalar_t(1);
    const scalar_t* xp = gated ? x.const_data_ptr<scalar_t>() : nullptr;
    dispatch_flags(relu, gated, [&]<bool RELU, bool GATED>() {
      epilogue_forward<scalar_t, RELU, GATED>(z.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), xp, g,
                                              out.mutable_data_ptr<scalar_t>(), v);
    });
  });
  return {out, z};
}

at::Tensor masked_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, c10::string_view activation,
                             const std::optional<at::Tensor>& gate_logit, double temperature) {
  return std::get<0>(masked_conv2d_forward_cpu(input, weight, bias, scale, stride, padding, dilation, groups,
                                               activation, gate_logit, temperature));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit, double temperature,
    std::array<bool, 3> conv_mask) {
  const bool relu = parse_activation(std::string(activation));
  const bool gated = gate_logit.has_value() && gate_logit->defined();
  check_same(grad_out, input, "grad_out", "input");
  TORCH_CHECK_VALUE(grad_out.sizes() == z.sizes(), "grad_out must have shape ", z.sizes(), ", got ",
                    grad_out.sizes());
  const auto fmt = conv_layout(input, weight);
  at::Tensor zc = z.contiguous(fmt);
  at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor x = gated ? input.contiguous(fmt) : at::Tensor();
  at::Tensor s = scale.contiguous();
  at::Tensor gz = at::empty(zc.sizes(), zc.options().memory_format(fmt));
  const ChannelView v = channel_view(zc, fmt == at::MemoryFormat::ChannelsLast);
  std::vector<double> grad_s(static_cast<size_t>(v.c), 0.0);
  double grad_g = 0.0;
  double g_value = 1.0;
  AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "masked_conv2d_backward_cpu", [&] {
    const scalar_t g = gated ? math::gate_value<scalar_t>(gate_logit->item<scalar_t>(), scalar_t(temperature))
                             : scalar_t(1);
    g_value = static_cast<double>(g);
    const scalar_t* xp = gated ? x.const_data_ptr<scalar_t>() : nullptr;
    dispatch_flags(relu, gated, [&]<bool RELU, bool GATED>() {
      grad_g = epilogue_backward<scalar_t, RELU, GATED>(go.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),
                                                        s.const_data_ptr<scalar_t>(), xp, g,
                                                        gz.mutable_data_ptr<scalar_t>(), grad_s.data(), v);
    });
  });
  at::Tensor grad_scale = at::tensor(grad_s, at::TensorOptions().dtype(at::kDouble)).to(scale.scalar_type());
  at::Tensor grad_gate = gated ? at::scalar_tensor(grad_g * g_value * (1.0 - g_value) / temperature,
                                                   gate_logit->options())
                               : at::empty({0}, input.options());
  // The gate's direct path (1 - G) * grad_out joins the input gradient after the conv backward.
  auto [gi, gw, gb] = at::convolution_backward(gz, input, weight, weight.size(0), stride, padding, dilation, false,
                                               {0, 0}, groups, conv_mask);
  at::Tensor grad_input = at::empty({0}, input.options());
  if (conv_mask[0]) {
    grad_input = canonical(gi, layout_of(input));
    if (gated) grad_input.add_(go, 1.0 - g_value);
  }
  at::Tensor grad_weight = conv_mask[1] ? canonical(gw, layout_of(weight)) : at::empty({0}, weight.options());
  at::Tensor grad_bias = conv_mask[2] ? canonical(gb, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  return {grad_input, grad_weight, grad_bias, grad_scale, grad_gate};
}

}  // namespace
}  // namespace cpu
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CPU, m) {
  m.impl("masked_conv2d", &nchains::cpu::masked_conv2d_cpu);
  m.impl("_masked_conv2d", &nchains::cpu::masked_conv2d_forward_cpu);
  m.impl("_masked_conv2d_backward", &nchains::cpu::masked_conv2d_backward_cpu);
}
