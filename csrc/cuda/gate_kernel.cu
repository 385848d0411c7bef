// CUDA kernels of gate: out = G * block_out + (1 - G) * block_in, and its fused backward
// (both input gradients and dL/dalpha in one pass). Same math, checks and layouts as
// cpu/gate_kernel.cpp; G is computed on the device from the 0-d logit, so nothing syncs the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/loops.cuh"
#include "math/epilogue.h"

namespace nchains {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ logit, scalar_t temperature, scalar_t* __restrict__ out,
                        index_t numel) {
  const scalar_t g = math::gate_value<scalar_t>(*logit, temperature);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = math::blend(y[i], x[i], g);
  }
}

// Writes both input gradients and this block's partial sum of dL/dG = sum(go * (y - x)) to
// part_g[blockIdx.x]; gate_grad finishes the sum in a fixed order.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ y,
                         const scalar_t* __restrict__ x, const scalar_t* __restrict__ logit, scalar_t temperature,
                         scalar_t* __restrict__ gy, scalar_t* __restrict__ gx, index_t numel,
                         double* __restrict__ part_g) {
  const scalar_t g = math::gate_value<scalar_t>(*logit, temperature);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  double acc = 0.0;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const scalar_t goi = go[i];
    gy[i] = g * goi;
    gx[i] = (scalar_t(1) - g) * goi;
    acc += static_cast<double>(goi * (y[i] - x[i]));
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part_g[blockIdx.x] = acc;
}

at::Tensor gate_cuda(const at::Tensor& block_out, const at::Tensor& block_in, const at::Tensor& gate_logit,
                     double temperature) {
  check_gate(block_out, block_in, gate_logit, temperature);
  c10::cuda::CUDAGuard device_guard(block_out.device());
  const auto fmt = layout_of(block_out);
  at::Tensor y = block_out.contiguous(fmt);
  at::Tensor x = block_in.contiguous(fmt);
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(fmt));
  const int64_t numel = y.numel();
  if (numel == 0) return out;
  const int64_t blocks = elementwise_blocks(numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_cuda", [&] {
    if (use_32bit(numel)) {
      gate_forward_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gate_logit.const_data_ptr<scalar_t>(),
          scalar_t(temperature), out.mutable_data_ptr<scalar_t>(), static_cast<int32_t>(numel));
    } else {
      gate_forward_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gate_logit.const_data_ptr<scalar_t>(),
          scalar_t(temperature), out.mutable_data_ptr<scalar_t>(), numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_backward_cuda(const at::Tensor& grad_out,
                                                                  const at::Tensor& block_out,
                                                                  const at::Tensor& block_in,
                                                                  const at::Tensor& gate_logit, double temperature) {
  check_gate(block_out, block_in, gate_logit, temperature);
  check_same(grad_out, block_out, "grad_out", "block_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == block_out.sizes(), "grad_out must have shape ", block_out.sizes(),
                    ", got ", grad_out.sizes());
  c10::cuda::CUDAGuard device_guard(block_out.device());
  const auto fmt = layout_of(block_out);
  at::Tensor y = block_out.contiguous(fmt);
  at::Tensor x = block_in.contiguous(fmt);
  at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor gy = at::empty(y.sizes(), y.options().memory_format(fmt));
  at::Tensor gx = at::empty(y.sizes(), y.options().memory_format(fmt));
  at::Tensor grad_gate = at::empty({}, gate_logit.options());
  const int64_t numel = y.numel();
  if (numel == 0) {
    grad_gate.zero_();
    return {gy, gx, grad_gate};
  }
  const int64_t blocks = elementwise_blocks(numel);
  at::Tensor part_g = at::empty({blocks}, y.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_backward_cuda", [&] {
    if (use_32bit(numel)) {
      gate_backward_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          gate_logit.const_data_ptr<scalar_t>(), scalar_t(temperature), gy.mutable_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), static_cast<int32_t>(numel), part_g.mutable_data_ptr<double>());
    } else {
      gate_backward_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          gate_logit.const_data_ptr<scalar_t>(), scalar_t(temperature), gy.mutable_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), numel, part_g.mutable_data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dL/dalpha = sum * dG/dalpha, with dG/dalpha evaluated in scalar_t as on the CPU.
    gate_grad<scalar_t, true>(part_g, gate_logit, temperature, grad_gate);
  });
  return {gy, gx, grad_gate};
}

}  // namespace
}  // namespace cuda
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CUDA, m) {
  m.impl("gate", &nchains::cuda::gate_cuda);
  m.impl("_gate_backward", &nchains::cuda::gate_backward_cuda);
}
