// CPU kernels of gate: out = G * block_out + (1 - G) * block_in, and its fused backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/loops.h"
#include "math/epilogue.h"

namespace nchains {
namespace cpu {
namespace {

at::Tensor gate_cpu(const at::Tensor& block_out, const at::Tensor& block_in, const at::Tensor& gate_logit,
                    double temperature) {
  check_gate(block_out, block_in, gate_logit, temperature);
  const auto fmt = layout_of(block_out);
  at::Tensor y = block_out.contiguous(fmt);
  at::Tensor x = block_in.contiguous(fmt);
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_cpu", [&] {
    const scalar_t g = math::gate_value<scalar_t>(gate_logit.item<scalar_t>(), scalar_t(temperature));
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_range(y.numel(), [&](int64_t begin, int64_t end) {
NC_PRAGMA(omp simd)
      for (int64_t i = begin; i < end; ++i) op[i] = math::blend(yp[i], xp[i], g);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward_cpu(const at::Tensor& grad_out,
                                                                 const at::Tensor& block_out,
                                                                 const at::Tensor& block_in,
                                                                 const at::Tensor& gate_logit, double temperature) {
  check_gate(block_out, block_in, gate_logit, temperature);
  check_same(grad_out, block_out, "grad_out", "block_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == block_out.sizes(), "grad_out must have shape ", block_out.sizes(),
                    ", got ", grad_out.sizes());
  const auto fmt = layout_of(block_out);
  at::Tensor y = block_out.contiguous(fmt);
  at::Tensor x = block_in.contiguous(fmt);
  at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor gy = at::empty(y.sizes(), y.options().memory_format(fmt));
  at::Tensor gx = at::empty(y.sizes(), y.options().memory_format(fmt));
  at::Tensor grad_gate;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_backward_cpu", [&] {
    const scalar_t g = math::gate_value<scalar_t>(gate_logit.item<scalar_t>(), scalar_t(temperature));
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* gyp = gy.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const double dG = parallel_sum(y.numel(), [&](int64_t begin, int64_t end) {
      double acc = 0.0;
NC_PRAGMA(omp simd reduction(+ : acc))
      for (int64_t i = begin; i < end; ++i) {
        gyp[i] = g * gop[i];
        gxp[i] = (scalar_t(1) - g) * gop[i];
        acc += static_cast<double>(gop[i] * (yp[i] - xp[i]));
      }
      return acc;
    });
    grad_gate = at::scalar_tensor(dG * static_cast<double>(math::gate_dvalue(g, scalar_t(temperature))),
                                  gate_logit.options());
  });
  return {gy, gx, grad_gate};
}

}  // namespace
}  // namespace cpu
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CPU, m) {
  m.impl("gate", &nchains::cpu::gate_cpu);
  m.impl("_gate_backward", &nchains::cpu::gate_backward_cpu);
}
