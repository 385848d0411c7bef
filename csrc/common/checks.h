// Argument validation and layout rules shared by the CPU and CUDA kernels (host code only).
// The fake kernels in nchains/_fake.py mirror the layout rules exactly.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace nchains {

// A 4-d tensor is treated as channels_last when it is dense in that format and not plain
// contiguous, or when it is both (a size-1 channel dim, e.g. a conv over one input channel) and
// its strides are channels_last's own (channel stride 1, more than one spatial element);
// everything else is treated as (made) contiguous NC*.
inline bool is_channels_last(const at::Tensor& t) {
  if (t.dim() != 4 || !t.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  if (!t.is_contiguous()) return true;
  return t.size(1) == 1 && t.stride(1) == 1 && t.size(2) * t.size(3) > 1;
}

inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return is_channels_last(t) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The layout masked_conv2d computes in: channels_last when its input or its weight is.
inline at::MemoryFormat conv_layout(const at::Tensor& input, const at::Tensor& weight) {
  return (is_channels_last(input) || is_channels_last(weight)) ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous;
}

// `t` itself when its strides are the canonical ones of `fmt` (what at::empty gives, and what the
// fake kernels predict), else a canonical copy. Size-1 dims can leave ATen outputs with other strides.
inline at::Tensor canonical(const at::Tensor& t, at::MemoryFormat fmt) {
  const auto sizes = t.sizes();
  std::vector<int64_t> want(sizes.size());
  if (fmt == at::MemoryFormat::ChannelsLast) {
    want[1] = 1;
    want[3] = sizes[1];
    want[2] = sizes[3] * sizes[1];
    want[0] = sizes[2] * sizes[3] * sizes[1];
  } else {
    int64_t stride = 1;
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
      want[d] = stride;
      stride *= sizes[d];
    }
  }
  if (t.strides() == at::IntArrayRef(want)) return t;
  at::Tensor out = at::empty(sizes, t.options().memory_format(fmt));
  out.copy_(t);
  return out;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
                    "), got ", t.device());
}

inline void check_gate_logit(const at::Tensor& gate_logit, const at::Tensor& ref, const char* ref_name) {
  check_same(gate_logit, ref, "gate_logit", ref_name);
  TORCH_CHECK_VALUE(gate_logit.dim() == 0, "gate_logit must be a 0-d tensor, got shape ", gate_logit.sizes());
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
}

inline bool parse_activation(const std::string& activation) {
  TORCH_CHECK_VALUE(activation == "relu" || activation == "none",
                    "activation must be 'none' or 'relu', got '", activation, "'");
  return activation == "relu";
}

inline bool parse_reduction(const std::string& reduction) {
  TORCH_CHECK_VALUE(reduction == "channel" || reduction == "none",
                    "reduction must be 'channel' or 'none', got '", reduction, "'");
  return reduction == "channel";
}

// Validates masked_conv2d's arguments; returns the output shape.
inline std::vector<int64_t> check_masked_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, int64_t groups,
                                                const std::optional<at::Tensor>& gate_logit, double temperature,
                                                const std::optional<at::Tensor>& residual,
                                                const std::optional<at::Tensor>& gate_input) {
  check_float(input, "input");
  check_same(weight, input, "weight", "input");
  check_same(scale, input, "scale", "input");
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be 4-d [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be 4-d [C_out, C_in/groups, kH, kW], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must have 2 elements");
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(groups >= 1, "groups must be >= 1, got ", groups);
  const int64_t c_out = weight.size(0);
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1) * groups, "input has ", input.size(1),
                    " channels but weight expects C_in = weight.size(1) * groups = ", weight.size(1) * groups);
  TORCH_CHECK_VALUE(c_out % groups == 0, "weight.size(0) = ", c_out, " must be divisible by groups = ", groups);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == c_out, "scale must have shape [", c_out,
                    "] (one score per filter), got ", scale.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same(*bias, input, "bias", "input");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c_out, "bias must have shape [", c_out, "], got ",
                      bias->sizes());
  }
  std::vector<int64_t> out_shape{input.size(0), c_out, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = input.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1;
    TORCH_CHECK_VALUE(extent >= 0, "input spatial size ", input.sizes().slice(2),
                      " is too small for kernel ", weight.sizes().slice(2), " with padding ", padding,
                      " and dilation ", dilation);
    out_shape[2 + d] = extent / stride[d] + 1;
  }
  check_temperature(temperature);
  if (gate_logit.has_value() && gate_logit->defined()) {
    check_gate_logit(*gate_logit, input, "input");
    const bool own = !(gate_input.has_value() && gate_input->defined());
    const at::IntArrayRef blended = own ? input.sizes() : gate_input->sizes();
    TORCH_CHECK_VALUE(at::IntArrayRef(out_shape) == blended, "a gated masked_conv2d needs an output shaped like ",
                      own ? "its input " : "gate_input ", blended, ", got ", at::IntArrayRef(out_shape));
  }
  if (residual.has_value() && residual->defined()) {
    check_same(*residual, input, "residual", "input");
    TORCH_CHECK_VALUE(at::IntArrayRef(out_shape) == residual->sizes(), "residual must have the output's shape ",
                      at::IntArrayRef(out_shape), ", got ", residual->sizes());
  }
  if (gate_input.has_value() && gate_input->defined()) {
    check_same(*gate_input, input, "gate_input", "input");
    TORCH_CHECK_VALUE(gate_logit.has_value() && gate_logit->defined(), "gate_input needs gate_logit");
  }
  return out_shape;
}

inline void check_gate(const at::Tensor& block_out, const at::Tensor& block_in, const at::Tensor& gate_logit,
                       double temperature) {
  check_float(block_out, "block_out");
  check_same(block_in, block_out, "block_in", "block_out");
  TORCH_CHECK_VALUE(block_in.sizes() == block_out.sizes(), "block_in must have the shape of block_out ",
                    block_out.sizes(), ", got ", block_in.sizes());
  check_gate_logit(gate_logit, block_out, "block_out");
  check_temperature(temperature);
}

inline void check_taylor(const at::Tensor& activation, const at::Tensor& grad) {
  check_float(activation, "activation");
  check_same(grad, activation, "grad", "activation");
  TORCH_CHECK_VALUE(activation.dim() >= 2, "activation must have shape [N, C, *spatial] or [N, C], got ",
                    activation.sizes());
  TORCH_CHECK_VALUE(grad.sizes() == activation.sizes(), "grad must have the shape of activation ",
                    activation.sizes(), ", got ", grad.sizes());
}

// View of a dense tensor as [N, C, S] in either layout.
struct ChannelView {
  int64_t n, c, s;
  bool channels_last;
};

inline ChannelView channel_view(const at::Tensor& t, bool channels_last) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return {t.size(0), t.size(1), s, channels_last};
}

}  // namespace nchains
