// Autograd kernels of the public ops, in C++ (as torchvision's csrc/ops/autograd): each forward
// runs the op below autograd and saves what its backward op needs; each backward is an op of its
// own (_<op>_backward), so torch.compile, torch.export and opcheck see it.
//
// Why not torch.library.register_autograd in Python: its wrapper costs ~0.5 ms per call and per
// backward on this machine, more than a small convolution itself (tools/bench_extract.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace nchains {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using MaskedConvForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view, const std::optional<at::Tensor>&, double,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using MaskedConvBackwardSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
        const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, std::array<bool, 3>);

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

class MaskedConv2dFunction : public torch::autograd::Function<MaskedConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& scale, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            const std::string& activation, const std::optional<at::Tensor>& gate_logit,
                            double temperature, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& gate_input) {
    static auto op = find_op<MaskedConvForwardSig>("nchains::_masked_conv2d");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, z] = op.call(input, weight, bias, scale, stride, padding, dilation, groups, activation, gate_logit,
                            temperature, residual, gate_input);
    ctx->save_for_backward({input, weight, z, scale, gate_logit.value_or(at::Tensor()),
                            residual.value_or(at::Tensor()), gate_input.value_or(at::Tensor())});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["has_bias"] = present(bias);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = find_op<MaskedConvBackwardSig>("nchains::_masked_conv2d_backward");
    const at::Tensor& grad = grad_outputs[0];
    variable_list result(13);
    if (!grad.defined()) return result;
    auto saved = ctx->get_saved_variables();
    const at::Tensor& gate_logit = saved[4];
    const at::Tensor& residual = saved[5];
    const at::Tensor& gate_input = saved[6];
    // needs_input_grad counts tensor inputs only; absent optionals have no edge. Edges in order:
    // input, weight, [bias], scale, [gate_logit], [residual], [gate_input].
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    size_t edge = has_bias ? 3 : 2;
    const size_t scale_edge = edge++;
    const size_t gate_edge = gate_logit.defined() ? edge++ : 0;
    const size_t residual_edge = residual.defined() ? edge++ : 0;
    const size_t gate_input_edge = gate_input.defined() ? edge++ : 0;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    auto [gi, gw, gb, gs, gg, gr, gx] =
        op.call(grad, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["stride"].toIntVector(),
                ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
                ctx->saved_data["groups"].toInt(), ctx->saved_data["activation"].toStringRef(), opt(gate_logit),
                ctx->saved_data["temperature"].toDouble(), opt(residual), opt(gate_input), mask);
    if (mask[0]) result[0] = gi;
    if (mask[1]) result[1] = gw;
    if (mask[2]) result[2] = gb;
    if (ctx->needs_input_grad(scale_edge)) result[3] = gs;
    if (gate_logit.defined() && ctx->needs_input_grad(gate_edge)) result[9] = gg;
    if (residual.defined() && ctx->needs_input_grad(residual_edge)) result[11] = gr;
    // (empty when gate_input is the residual itself: grad_residual then holds its whole gradient)
    if (gate_input.defined() && ctx->needs_input_grad(gate_input_edge) && gx.dim() == gate_input.dim()) {
      result[12] = gx;
    }
    return result;
  }
};

at::Tensor masked_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, c10::string_view activation,
                                  const std::optional<at::Tensor>& gate_logit, double temperature,
                                  const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& gate_input) {
  return MaskedConv2dFunction::apply(input, weight, bias, scale, stride, padding, dilation, groups,
                                     std::string(activation), gate_logit, temperature, residual, gate_input);
}

using GateSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
using GateBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, double);

class GateFunction : public torch::autograd::Function<GateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& block_out, const at::Tensor& block_in,
                            const at::Tensor& gate_logit, double temperature) {
    static auto op = find_op<GateSig>("nchains::gate");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({block_out, block_in, gate_logit});
    ctx->saved_data["temperature"] = temperature;
    return op.call(block_out, block_in, gate_logit, temperature);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = find_op<GateBackwardSig>("nchains::_gate_backward");
    variable_list result(4);
    if (!grad_outputs[0].defined()) return result;
    auto saved = ctx->get_saved_variables();
    auto [gy, gx, gg] = op.call(grad_outputs[0], saved[0], saved[1], saved[2],
                                ctx->saved_data["temperature"].toDouble());
    for (int i = 0; i < 3; ++i) {
      if (ctx->needs_input_grad(i)) result[i] = i == 0 ? gy : (i == 1 ? gx : gg);
    }
    return result;
  }
};

at::Tensor gate_autograd(const at::Tensor& block_out, const at::Tensor& block_in, const at::Tensor& gate_logit,
                         double temperature) {
  return GateFunction::apply(block_out, block_in, gate_logit, temperature);
}

using TaylorSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, bool);
using TaylorBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             c10::string_view, bool);

class TaylorFunction : public torch::autograd::Function<TaylorFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& activation, const at::Tensor& grad,
                            const std::string& reduction, bool absolute) {
    static auto op = find_op<TaylorSig>("nchains::taylor_contributions");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({activation, grad});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["absolute"] = absolute;
    return op.call(activation, grad, reduction, absolute);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = find_op<TaylorBackwardSig>("nchains::_taylor_contributions_backward");
    variable_list result(4);
    if (!grad_outputs[0].defined()) return result;
    auto saved = ctx->get_saved_variables();
    auto [ga, gg] = op.call(grad_outputs[0], saved[0], saved[1], ctx->saved_data["reduction"].toStringRef(),
                            ctx->saved_data["absolute"].toBool());
    if (ctx->needs_input_grad(0)) result[0] = ga;
    if (ctx->needs_input_grad(1)) result[1] = gg;
    return result;
  }
};

at::Tensor taylor_autograd(const at::Tensor& activation, const at::Tensor& grad, c10::string_view reduction,
                           bool absolute) {
  return TaylorFunction::apply(activation, grad, std::string(reduction), absolute);
}

}  // namespace

TORCH_LIBRARY_IMPL(nchains, Autograd, m) {
  m.impl("masked_conv2d", &masked_conv2d_autograd);
  m.impl("gate", &gate_autograd);
  m.impl("taylor_contributions", &taylor_autograd);
}

}  // namespace nchains
