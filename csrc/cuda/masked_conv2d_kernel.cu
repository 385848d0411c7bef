// CUDA kernels of masked_conv2d: ATen's convolution (cuDNN) plus a fused epilogue (score,
// residual, activation, gate blend) and a fused backward epilogue (grad_z, grad_residual,
// per-filter grad_scale, grad_gate_logit). Host steps are shared with the CPU kernels
// (common/masked_conv2d_host.h); same element math (math/epilogue.h) and output layouts as
// cpu/masked_conv2d_kernel.cpp. The gate logit is read on the device: no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "common/masked_conv2d_host.h"
#include "cuda/loops.cuh"
#include "math/epilogue.h"

namespace nchains {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t, bool RELU, bool GATED, bool RES>
__global__ void __launch_bounds__(kThreads)
    epilogue_forward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ s,
                            const scalar_t* __restrict__ r, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ logit, scalar_t temperature, scalar_t* __restrict__ out,
                            index_t numel, index_t c_n, index_t s_n, bool channels_last) {
  const scalar_t g = GATED ? math::gate_value<scalar_t>(*logit, temperature) : scalar_t(1);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t c = channels_last ? i % c_n : (i / s_n) % c_n;
    const scalar_t zi = z[i];
    out[i] = math::epilogue_forward<RELU, GATED, RES>(zi, s[c], RES ? r[i] : zi, GATED ? x[i] : zi, g);
  }
}

template <typename scalar_t, typename index_t, bool RELU, bool GATED, bool RES>
void launch_forward(const ForwardPlan& p, const scalar_t* logit, double temperature) {
  const int64_t numel = p.z.numel();
  epilogue_forward_kernel<scalar_t, index_t, RELU, GATED, RES>
      <<<elementwise_blocks(numel), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          p.z.const_data_ptr<scalar_t>(), p.s.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(p.r),
          data_or_null<scalar_t>(p.x), logit, scalar_t(temperature), p.out.mutable_data_ptr<scalar_t>(),
          static_cast<index_t>(numel), static_cast<index_t>(p.v.c), static_cast<index_t>(p.v.s),
          p.v.channels_last);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One element of the backward epilogue, for the reduction kernels of cuda/loops.cuh.
template <typename scalar_t, bool RELU, bool GATED, bool RES>
struct BackwardBody {
  const scalar_t* go;
  const scalar_t* z;
  const scalar_t* s;
  const scalar_t* r;
  const scalar_t* x;
  scalar_t* gz;
  scalar_t* gr;
  const scalar_t* logit;
  scalar_t temperature;
  bool shared;  // r is also what the gate blends with: gr gets the direct path (1 - G) * go too
  scalar_t g;
  scalar_t direct;

  __device__ __forceinline__ void prepare() {
    g = GATED ? math::gate_value<scalar_t>(*logit, temperature) : scalar_t(1);
    direct = shared ? scalar_t(1) - g : scalar_t(0);
  }
  __device__ __forceinline__ void operator()(int64_t i, int64_t c, double& acc_s, double& acc_g) const {
    const scalar_t zi = z[i];
    scalar_t gu;
    gz[i] = math::epilogue_backward<RELU, GATED, RES>(go[i], zi, s[c], RES ? r[i] : zi, GATED ? x[i] : zi, g, gu,
                                                      acc_s, acc_g);
    if constexpr (RES) gr[i] = gu + direct * go[i];
  }
};

// The gate's direct path (1 - G) * grad_out, G read from the device: added to out when ADD (the
// CPU kernel's grad_input.add_(go, 1 - G)), else written to it (its go.mul(1 - G)).
template <typename scalar_t, typename index_t, bool ADD>
__global__ void __launch_bounds__(kThreads)
    direct_path_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ go,
                       const scalar_t* __restrict__ logit, scalar_t temperature, index_t numel) {
  const scalar_t g = math::gate_value<scalar_t>(*logit, temperature);
  const scalar_t alpha = static_cast<scalar_t>(1.0 - static_cast<double>(g));
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    if constexpr (ADD) {
      out[i] += alpha * go[i];
    } else {
      out[i] = alpha * go[i];
    }
  }
}

// `go` must have the layout (element order) of `out`.
template <bool ADD>
void direct_path(const at::Tensor& out, const at::Tensor& go, const at::Tensor& gate_logit, double temperature) {
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const int64_t blocks = elementwise_blocks(numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_conv2d_direct_path_cuda", [&] {
    if (use_32bit(numel)) {
      direct_path_kernel<scalar_t, int32_t, ADD><<<blocks, kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), gate_logit.const_data_ptr<scalar_t>(),
          scalar_t(temperature), static_cast<int32_t>(numel));
    } else {
      direct_path_kernel<scalar_t, int64_t, ADD><<<blocks, kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), gate_logit.const_data_ptr<scalar_t>(),
          scalar_t(temperature), numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::TensorOptions double_on(const at::Tensor& t) { return t.options().dtype(at::kDouble); }

// The device of a CUDA tensor; a tensor on another device is left to the argument checks, which
// name it (a CUDAGuard would reject it first, with a less helpful message).
std::optional<at::Device> cuda_device_of(const at::Tensor& t) {
  return t.is_cuda() ? std::optional<at::Device>(t.device()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit, double temperature,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate_input) {
  c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  ForwardPlan p = plan_forward(input, weight, bias, scale, stride, padding, dilation, groups, activation, gate_logit,
                               temperature, residual, gate_input);
  if (p.z.numel() == 0) return {p.out, p.z};
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "masked_conv2d_cuda", [&] {
    const scalar_t* logit = p.gated ? gate_logit->const_data_ptr<scalar_t>() : nullptr;
    dispatch_flags(p.relu, p.gated, p.res, [&]<bool RELU, bool GATED, bool RES>() {
      use_32bit(p.z.numel()) ? launch_forward<scalar_t, int32_t, RELU, GATED, RES>(p, logit, temperature)
                             : launch_forward<scalar_t, int64_t, RELU, GATED, RES>(p, logit, temperature);
    });
  });
  return {p.out, p.z};
}

at::Tensor masked_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, c10::string_view activation,
                              const std::optional<at::Tensor>& gate_logit, double temperature,
                              const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate_input) {
  return std::get<0>(masked_conv2d_forward_cuda(input, weight, bias, scale, stride, padding, dilation, groups,
                                                activation, gate_logit, temperature, residual, gate_input));
}

// Fills p.gz, p.gr (when RES), grad_scale and (when GATED) grad_gate; every sum is a two-pass
// deterministic reduction.
template <typename scalar_t, bool RELU, bool GATED, bool RES>
void backward_epilogue(const BackwardPlan& p, const std::optional<at::Tensor>& gate_logit, double temperature,
                       const at::Tensor& grad_scale, const at::Tensor& grad_gate) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const ChannelView& v = p.v;
  BackwardBody<scalar_t, RELU, GATED, RES> body{p.go.const_data_ptr<scalar_t>(),
                                                p.z.const_data_ptr<scalar_t>(),
                                                p.s.const_data_ptr<scalar_t>(),
                                                data_or_null<scalar_t>(p.r),
                                                data_or_null<scalar_t>(p.x),
                                                p.gz.mutable_data_ptr<scalar_t>(),
                                                RES ? p.gr.mutable_data_ptr<scalar_t>() : nullptr,
                                                GATED ? gate_logit->const_data_ptr<scalar_t>() : nullptr,
                                                scalar_t(temperature),
                                                p.shared,
                                                scalar_t(1),
                                                scalar_t(0)};
  at::Tensor part_s, part_g;
  if (!v.channels_last) {
    const PlanePlan pp = plan_planes(v);
    part_s = at::empty({pp.tasks}, double_on(p.go));
    if (GATED) part_g = at::empty({pp.blocks}, double_on(p.go));
    plane_reduce_kernel<GATED><<<pp.blocks, kThreads, 0, stream>>>(
        body, pp, part_s.mutable_data_ptr<double>(), GATED ? part_g.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // part_s is [N, C, splits]: grad_scale[c] sums over n and splits.
    sum_partials(part_s, grad_scale.mutable_data_ptr<scalar_t>(),
                 SumPlan{1, v.c, 0, pp.splits, v.n, v.c * pp.splits, pp.splits, 1});
  } else {
    const RowsPlan rp = plan_rows(v);
    part_s = at::empty({rp.tasks * v.c}, double_on(p.go));
    if (GATED) part_g = at::empty({int64_t(rp.grid.x) * rp.grid.y}, double_on(p.go));
    rows_reduce_kernel<GATED><<<rp.grid, rp.block, 0, stream>>>(
        body, rp, part_s.mutable_data_ptr<double>(), GATED ? part_g.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // part_s is [N * pieces, C].
    sum_partials(part_s, grad_scale.mutable_data_ptr<scalar_t>(), SumPlan{1, v.c, 0, 1, rp.tasks, v.c, 1, 0});
  }
  if constexpr (GATED) gate_grad<scalar_t, false>(part_g, *gate_logit, temperature, grad_gate);
}

MaskedConvGrads masked_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit, double temperature,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate_input,
    std::array<bool, 3> conv_mask) {
  c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  BackwardPlan p = plan_backward(grad_out, input, weight, z, scale, activation, gate_logit, residual, gate_input);
  at::Tensor grad_scale = at::empty({p.v.c}, scale.options());
  at::Tensor grad_gate = p.gated ? at::empty({}, gate_logit->options()) : at::empty({0}, input.options());
  if (p.z.numel() == 0) {
    grad_scale.zero_();
    if (p.gated) grad_gate.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "masked_conv2d_backward_cuda", [&] {
      dispatch_flags(p.relu, p.gated, p.res, [&]<bool RELU, bool GATED, bool RES>() {
        backward_epilogue<scalar_t, RELU, GATED, RES>(p, gate_logit, temperature, grad_scale, grad_gate);
      });
    });
  }
  auto [grad_input, grad_weight, grad_bias] = conv_grads(p, input, weight, stride, padding, dilation, groups, conv_mask);
  // The gate's direct path (1 - G) * grad_out goes to what the gate blends with.
  at::Tensor grad_gate_input = at::empty({0}, input.options());
  if (p.gated && p.own_gate_input && conv_mask[0]) {
    direct_path<true>(grad_input, p.go.contiguous(layout_of(input)), *gate_logit, temperature);
  }
  if (p.gated && !p.own_gate_input && !p.shared) {
    grad_gate_input = at::empty(p.go.sizes(), p.go.options().memory_format(p.fmt));
    direct_path<false>(grad_gate_input, p.go, *gate_logit, temperature);
  }
  at::Tensor grad_residual = p.res ? p.gr : at::empty({0}, input.options());
  return {grad_input, grad_weight, grad_bias, grad_scale, grad_gate, grad_residual, grad_gate_input};
}

}  // namespace
}  // namespace cuda
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CUDA, m) {
  m.impl("masked_conv2d", &nchains::cuda::masked_conv2d_cuda);
  m.impl("_masked_conv2d", &nchains::cuda::masked_conv2d_forward_cuda);
  m.impl("_masked_conv2d_backward", &nchains::cuda::masked_conv2d_backward_cuda);
}
