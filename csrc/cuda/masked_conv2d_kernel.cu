// CUDA kernels of masked_conv2d: ATen's convolution (cuDNN) plus a fused epilogue (score,
// activation, gate blend) and a fused backward epilogue (grad_z, per-filter grad_scale,
// grad_gate_logit). Same element math (math/epilogue.h), checks and output layouts as the CPU
// kernels in cpu/masked_conv2d_kernel.cpp. The gate logit is read on the device: no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/loops.cuh"
#include "math/epilogue.h"

namespace nchains {
namespace cuda {
namespace {

template <typename scalar_t, typename index_t, bool RELU, bool GATED>
__global__ void __launch_bounds__(kThreads)
    epilogue_forward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ s,
                            const scalar_t* __restrict__ x, const scalar_t* __restrict__ logit, scalar_t temperature,
                            scalar_t* __restrict__ out, index_t numel, index_t c_n, index_t s_n, bool channels_last) {
  const scalar_t g = GATED ? math::gate_value<scalar_t>(*logit, temperature) : scalar_t(1);
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t c = channels_last ? i % c_n : (i / s_n) % c_n;
    const scalar_t zi = z[i];
    out[i] = math::epilogue_forward<RELU, GATED>(zi, s[c], GATED ? x[i] : zi, g);
  }
}

// One element of the backward epilogue, for the reduction kernels of cuda/loops.cuh.
template <typename scalar_t, bool RELU, bool GATED>
struct BackwardBody {
  const scalar_t* go;
  const scalar_t* z;
  const scalar_t* s;
  const scalar_t* x;
  scalar_t* gz;
  const scalar_t* logit;
  scalar_t temperature;
  scalar_t g;

  __device__ __forceinline__ void prepare() {
    g = GATED ? math::gate_value<scalar_t>(*logit, temperature) : scalar_t(1);
  }
  __device__ __forceinline__ void operator()(int64_t i, int64_t c, double& acc_s, double& acc_g) const {
    const scalar_t zi = z[i];
    gz[i] = math::epilogue_backward<RELU, GATED>(go[i], zi, s[c], GATED ? x[i] : zi, g, acc_s, acc_g);
  }
};

// grad_input += (1 - G) * grad_out: the gate's direct path, as the CPU kernel's add_(go, 1 - G).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    add_direct_path_kernel(scalar_t* __restrict__ gi, const scalar_t* __restrict__ go,
                           const scalar_t* __restrict__ logit, scalar_t temperature, index_t numel) {
  const scalar_t g = math::gate_value<scalar_t>(*logit, temperature);
  const scalar_t alpha = static_cast<scalar_t>(1.0 - static_cast<double>(g));
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    gi[i] += alpha * go[i];
  }
}

at::MemoryFormat conv_layout(const at::Tensor& input, const at::Tensor& weight) {
  return (is_channels_last(input) || is_channels_last(weight)) ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous;
}

at::TensorOptions double_on(const at::Tensor& t) { return t.options().dtype(at::kDouble); }

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit,
    double temperature) {
  check_masked_conv2d(input, weight, bias, scale, stride, padding, dilation, groups, gate_logit, temperature);
  const bool relu = parse_activation(std::string(activation));
  const bool gated = gate_logit.has_value() && gate_logit->defined();
  c10::cuda::CUDAGuard device_guard(input.device());
  const auto fmt = conv_layout(input, weight);
  at::Tensor z = canonical(
      at::convolution(input, weight, bias, stride, padding, dilation, false, {0, 0}, groups), fmt);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(fmt));
  const int64_t numel = z.numel();
  if (numel == 0) return {out, z};
  at::Tensor s = scale.contiguous();
  at::Tensor x = gated ? input.contiguous(fmt) : at::Tensor();
  const ChannelView v = channel_view(z, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t blocks = elementwise_blocks(numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "masked_conv2d_cuda", [&] {
    const scalar_t* xp = gated ? x.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* lp = gated ? gate_logit->const_data_ptr<scalar_t>() : nullptr;
    dispatch_flags(relu, gated, [&]<bool RELU, bool GATED>() {
      if (use_32bit(numel)) {
        epilogue_forward_kernel<scalar_t, int32_t, RELU, GATED><<<blocks, kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), xp, lp, scalar_t(temperature),
            out.mutable_data_ptr<scalar_t>(), static_cast<int32_t>(numel), static_cast<int32_t>(v.c),
            static_cast<int32_t>(v.s), v.channels_last);
      } else {
        epilogue_forward_kernel<scalar_t, int64_t, RELU, GATED><<<blocks, kThreads, 0, stream>>>(
            z.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), xp, lp, scalar_t(temperature),
            out.mutable_data_ptr<scalar_t>(), numel, v.c, v.s, v.channels_last);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, z};
}

at::Tensor masked_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, c10::string_view activation,
                              const std::optional<at::Tensor>& gate_logit, double temperature) {
  return std::get<0>(masked_conv2d_forward_cuda(input, weight, bias, scale, stride, padding, dilation, groups,
                                                activation, gate_logit, temperature));
}

// Fills gz, grad_scale and (when gated) grad_gate; every sum is a two-pass deterministic reduction.
template <typename scalar_t, bool RELU, bool GATED>
void backward_epilogue(const at::Tensor& go, const at::Tensor& z, const at::Tensor& s, const at::Tensor& x,
                       const std::optional<at::Tensor>& gate_logit, double temperature, const at::Tensor& gz,
                       const at::Tensor& grad_scale, const at::Tensor& grad_gate, const ChannelView& v) {
  auto stream = at::cuda::getCurrentCUDAStream();
  BackwardBody<scalar_t, RELU, GATED> body{go.const_data_ptr<scalar_t>(),
                                           z.const_data_ptr<scalar_t>(),
                                           s.const_data_ptr<scalar_t>(),
                                           GATED ? x.const_data_ptr<scalar_t>() : nullptr,
                                           gz.mutable_data_ptr<scalar_t>(),
                                           GATED ? gate_logit->const_data_ptr<scalar_t>() : nullptr,
                                           scalar_t(temperature),
                                           scalar_t(1)};
  at::Tensor part_s, part_g;
  if (!v.channels_last) {
    const PlanePlan p = plan_planes(v);
    part_s = at::empty({p.tasks}, double_on(go));
    if (GATED) part_g = at::empty({p.blocks}, double_on(go));
    plane_reduce_kernel<GATED><<<p.blocks, kThreads, 0, stream>>>(
        body, p, part_s.mutable_data_ptr<double>(), GATED ? part_g.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // part_s is [N, C, splits]: grad_scale[c] sums over n and splits.
    sum_partials(part_s, grad_scale.mutable_data_ptr<scalar_t>(),
                 SumPlan{1, v.c, 0, p.splits, v.n, v.c * p.splits, p.splits, 1});
  } else {
    const RowsPlan p = plan_rows(v);
    part_s = at::empty({p.tasks * v.c}, double_on(go));
    if (GATED) part_g = at::empty({int64_t(p.grid.x) * p.grid.y}, double_on(go));
    rows_reduce_kernel<GATED><<<p.grid, p.block, 0, stream>>>(
        body, p, part_s.mutable_data_ptr<double>(), GATED ? part_g.mutable_data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // part_s is [N * pieces, C].
    sum_partials(part_s, grad_scale.mutable_data_ptr<scalar_t>(), SumPlan{1, v.c, 0, 1, p.tasks, v.c, 1, 0});
  }
  if constexpr (GATED) gate_grad<scalar_t, false>(part_g, *gate_logit, temperature, grad_gate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, c10::string_view activation, const std::optional<at::Tensor>& gate_logit, double temperature,
    std::array<bool, 3> conv_mask) {
  const bool relu = parse_activation(std::string(activation));
  const bool gated = gate_logit.has_value() && gate_logit->defined();
  check_same(grad_out, input, "grad_out", "input");
  TORCH_CHECK_VALUE(grad_out.sizes() == z.sizes(), "grad_out must have shape ", z.sizes(), ", got ",
                    grad_out.sizes());
  // The forward's checks guarantee these; a kernel would dereference a pointer of another device.
  check_same(z, input, "z", "input");
  check_same(scale, input, "scale", "input");
  if (gated) check_gate_logit(*gate_logit, input, "input");
  c10::cuda::CUDAGuard device_guard(input.device());
  const auto fmt = conv_layout(input, weight);
  at::Tensor zc = z.contiguous(fmt);
  at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor x = gated ? input.contiguous(fmt) : at::Tensor();
  at::Tensor s = scale.contiguous();
  at::Tensor gz = at::empty(zc.sizes(), zc.options().memory_format(fmt));
  const ChannelView v = channel_view(zc, fmt == at::MemoryFormat::ChannelsLast);
  at::Tensor grad_scale = at::empty({v.c}, scale.options());
  at::Tensor grad_gate = gated ? at::empty({}, gate_logit->options()) : at::empty({0}, input.options());
  if (zc.numel() == 0) {
    grad_scale.zero_();
    if (gated) grad_gate.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "masked_conv2d_backward_cuda", [&] {
      dispatch_flags(relu, gated, [&]<bool RELU, bool GATED>() {
        backward_epilogue<scalar_t, RELU, GATED>(go, zc, s, x, gate_logit, temperature, gz, grad_scale, grad_gate,
                                                 v);
      });
    });
  }
  // The gate's direct path (1 - G) * grad_out joins the input gradient after the conv backward.
  auto [gi, gw, gb] = at::convolution_backward(gz, input, weight, weight.size(0), stride, padding, dilation, false,
                                               {0, 0}, groups, conv_mask);
  at::Tensor grad_input = at::empty({0}, input.options());
  if (conv_mask[0]) {
    grad_input = canonical(gi, layout_of(input));
    const int64_t numel = grad_input.numel();
    if (gated && numel > 0) {
      at::Tensor go_in = go.contiguous(layout_of(input));  // same element order as grad_input
      const int64_t blocks = elementwise_blocks(numel);
      auto stream = at::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "masked_conv2d_direct_path_cuda", [&] {
        if (use_32bit(numel)) {
          add_direct_path_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(
              grad_input.mutable_data_ptr<scalar_t>(), go_in.const_data_ptr<scalar_t>(),
              gate_logit->const_data_ptr<scalar_t>(), scalar_t(temperature), static_cast<int32_t>(numel));
        } else {
          add_direct_path_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
              grad_input.mutable_data_ptr<scalar_t>(), go_in.const_data_ptr<scalar_t>(),
              gate_logit->const_data_ptr<scalar_t>(), scalar_t(temperature), numel);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  at::Tensor grad_weight = conv_mask[1] ? canonical(gw, layout_of(weight)) : at::empty({0}, weight.options());
  at::Tensor grad_bias = conv_mask[2] ? canonical(gb, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  return {grad_input, grad_weight, grad_bias, grad_scale, grad_gate};
}

}  // namespace
}  // namespace cuda
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CUDA, m) {
  m.impl("masked_conv2d", &nchains::cuda::masked_conv2d_cuda);
  m.impl("_masked_conv2d", &nchains::cuda::masked_conv2d_forward_cuda);
  m.impl("_masked_conv2d_backward", &nchains::cuda::masked_conv2d_backward_cuda);
}
