// Autograd kernel of masked_conv2d: route through _masked_conv2d, whose autograd formula
// (nchains/_autograd.py) saves the conv output z so the backward never recomputes the conv.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace nchains {
namespace {

at::Tensor masked_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, c10::string_view activation,
                                  const std::optional<at::Tensor>& gate_logit, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nchains::_masked_conv2d", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                           c10::string_view, const std::optional<at::Tensor>&, double)>();
  return std::get<0>(op.call(input, weight, bias, scale, stride, padding, dilation, groups, activation,
                             gate_logit, temperature));
}

}  // namespace

TORCH_LIBRARY_IMPL(nchains, Autograd, m) {
  m.impl("masked_conv2d", &masked_conv2d_autograd);
}

}  // namespace nchains
