// Host-side steps of masked_conv2d shared by the CPU and CUDA kernels: argument checks, the
// convolution and its backward, layouts and buffers around the device-specific fused epilogues
// (cpu/masked_conv2d_kernel.cpp, cuda/masked_conv2d_kernel.cu).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>

#include "common/checks.h"

namespace nchains {

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A plan tensor's data, or null for an absent one (r, x when the flags say so).
template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// Runs fn.template operator()<RELU, GATED, RES>() for the runtime flags.
template <bool RES, typename F>
void dispatch_relu_gated(bool relu, bool gated, const F& fn) {
  if (relu) {
    gated ? fn.template operator()<true, true, RES>() : fn.template operator()<true, false, RES>();
  } else {
    gated ? fn.template operator()<false, true, RES>() : fn.template operator()<false, false, RES>();
  }
}

template <typename F>
void dispatch_flags(bool relu, bool gated, bool res, const F& fn) {
  res ? dispatch_relu_gated<true>(relu, gated, fn) : dispatch_relu_gated<false>(relu, gated, fn);
}

// Everything the forward epilogue reads and writes, in the layout `fmt` the conv ran in.
struct ForwardPlan {
  bool relu = false, gated = false, res = false;
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  at::Tensor z, out, s;
  at::Tensor r;  // the residual (res)
  at::Tensor x;  // what the gate blends with: gate_input, else the conv's input (gated)
  ChannelView v{};
};

// Checks the arguments and runs the convolution (call under the device's guard).
inline ForwardPlan plan_forward(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, c10::string_view activation,
                                const std::optional<at::Tensor>& gate_logit, double temperature,
                                const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& gate_input) {
  check_masked_conv2d(input, weight, bias, scale, stride, padding, dilation, groups, gate_logit, temperature,
                      residual, gate_input);
  ForwardPlan p;
  p.relu = parse_activation(std::string(activation));
  p.gated = defined(gate_logit);
  p.res = defined(residual);
  p.fmt = conv_layout(input, weight);
  p.z = canonical(
      at::convolution(input.contiguous(p.fmt), weight, bias, stride, padding, dilation, false, {0, 0}, groups),
      p.fmt);
  p.out = at::empty(p.z.sizes(), p.z.options().memory_format(p.fmt));
  p.s = scale.contiguous();
  if (p.res) p.r = residual->contiguous(p.fmt);
  if (p.gated) p.x = (defined(gate_input) ? *gate_input : input).contiguous(p.fmt);
  p.v = channel_view(p.z, p.fmt == at::MemoryFormat::ChannelsLast);
  return p;
}

// Everything the backward epilogue reads and writes, in the forward's layout `fmt`.
struct BackwardPlan {
  bool relu = false, gated = false, res = false;
  bool own_gate_input = true;  // the gate blends with the conv's input (no gate_input)
  // residual and gate_input are one tensor (an identity shortcut gated with the block's input):
  // its whole gradient, gu + (1 - G) * grad_out, goes to grad_residual; grad_gate_input is empty.
  bool shared = false;
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  at::Tensor z, go, s, r, x;
  at::Tensor gz;  // grad of the conv output
  at::Tensor gr;  // grad of the residual (res)
  ChannelView v{};
};

inline BackwardPlan plan_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& z, const at::Tensor& scale, c10::string_view activation,
                                  const std::optional<at::Tensor>& gate_logit,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& gate_input) {
  BackwardPlan p;
  p.relu = parse_activation(std::string(activation));
  p.gated = defined(gate_logit);
  p.res = defined(residual);
  p.own_gate_input = !defined(gate_input);
  p.shared = p.res && p.gated && !p.own_gate_input && residual->is_same(*gate_input);
  check_same(grad_out, input, "grad_out", "input");
  TORCH_CHECK_VALUE(grad_out.sizes() == z.sizes(), "grad_out must have shape ", z.sizes(), ", got ",
                    grad_out.sizes());
  // The forward's checks guarantee these; a kernel would read memory of another device.
  check_same(z, input, "z", "input");
  check_same(scale, input, "scale", "input");
  if (p.gated) check_gate_logit(*gate_logit, input, "input");
  for (const auto* t : {&residual, &gate_input}) {
    if (defined(*t)) {
      check_same(**t, input, "residual/gate_input", "input");
      TORCH_CHECK_VALUE((*t)->sizes() == z.sizes(), "residual/gate_input must have shape ", z.sizes());
    }
  }
  p.fmt = conv_layout(input, weight);
  p.z = z.contiguous(p.fmt);
  p.go = grad_out.contiguous(p.fmt);
  p.s = scale.contiguous();
  if (p.res) p.r = residual->contiguous(p.fmt);
  if (p.gated) p.x = (p.own_gate_input ? input : *gate_input).contiguous(p.fmt);
  p.gz = at::empty(p.z.sizes(), p.z.options().memory_format(p.fmt));
  if (p.res) p.gr = at::empty(p.z.sizes(), p.z.options().memory_format(p.fmt));
  p.v = channel_view(p.z, p.fmt == at::MemoryFormat::ChannelsLast);
  return p;
}

// ATen's convolution backward from grad_z; grads not asked for by conv_mask are empty tensors.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_grads(const BackwardPlan& p, const at::Tensor& input,
                                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                 int64_t groups, std::array<bool, 3> conv_mask) {
  auto [gi, gw, gb] = at::convolution_backward(p.gz, input, weight, weight.size(0), stride, padding, dilation, false,
                                               {0, 0}, groups, conv_mask);
  at::Tensor grad_input = conv_mask[0] ? canonical(gi, layout_of(input)) : at::empty({0}, input.options());
  at::Tensor grad_weight = conv_mask[1] ? canonical(gw, layout_of(weight)) : at::empty({0}, weight.options());
  at::Tensor grad_bias = conv_mask[2] ? canonical(gb, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  return {grad_input, grad_weight, grad_bias};
}

using MaskedConvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace nchains
