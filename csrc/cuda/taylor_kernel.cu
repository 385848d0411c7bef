// CUDA kernels of taylor_contributions: a * g (or |a * g|), elementwise or summed per (n, c) in
// one pass without materialising a * g, and its backward. Same math (math/epilogue.h), checks and
// layouts as cpu/taylor_kernel.cpp; the channel sums are deterministic two-pass reductions.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/loops.cuh"
#include "math/epilogue.h"

namespace nchains {
namespace cuda {
namespace {

// One element of the channel reduction, for the reduction kernels of cuda/loops.cuh.
template <typename scalar_t, bool ABS>
struct TaylorBody {
  const scalar_t* a;
  const scalar_t* g;

  __device__ __forceinline__ void prepare() {}
  __device__ __forceinline__ void operator()(int64_t i, int64_t, double& acc, double&) const {
    acc += static_cast<double>(math::taylor<ABS>(a[i], g[i]));
  }
};

template <typename scalar_t, typename index_t, bool ABS>
__global__ void __launch_bounds__(kThreads)
    taylor_elementwise_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ g,
                              scalar_t* __restrict__ out, index_t numel) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = math::taylor<ABS>(a[i], g[i]);
  }
}

// Where element i finds its upstream gradient.
enum class GradOut : int { kElementwise, kPlane, kChannelsLast };

template <typename scalar_t, typename index_t, bool ABS>
__global__ void __launch_bounds__(kThreads)
    taylor_backward_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ a,
                           const scalar_t* __restrict__ g, scalar_t* __restrict__ ga, scalar_t* __restrict__ gg,
                           index_t numel, index_t c_n, index_t s_n, GradOut mode) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    index_t k = i;  // go is [N, C, *] elementwise, else [N, C] broadcast over the spatial dims
    if (mode == GradOut::kPlane) {
      k = i / s_n;
    } else if (mode == GradOut::kChannelsLast) {
      k = (i / (s_n * c_n)) * c_n + i % c_n;
    }
    const scalar_t gok = go[k], ai = a[i], gi = g[i];
    ga[i] = math::taylor_dfirst<ABS>(gok, ai, gi);
    gg[i] = math::taylor_dfirst<ABS>(gok, gi, ai);
  }
}

template <typename scalar_t, bool ABS>
void taylor_channel(const at::Tensor& a, const at::Tensor& g, const at::Tensor& out, const ChannelView& v) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const TaylorBody<scalar_t, ABS> body{a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>()};
  const auto dopt = a.options().dtype(at::kDouble);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  if (!v.channels_last) {
    const PlanePlan p = plan_planes(v);
    at::Tensor part = at::empty({p.tasks}, dopt);
    plane_reduce_kernel<false><<<p.blocks, kThreads, 0, stream>>>(body, p, part.mutable_data_ptr<double>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // part is [N * C, splits].
    sum_partials(part, op, SumPlan{1, v.n * v.c, 0, p.splits, p.splits, 1, 1, 0});
  } else {
    const RowsPlan p = plan_rows(v);
    at::Tensor part = at::empty({p.tasks * v.c}, dopt);
    rows_reduce_kernel<false><<<p.grid, p.block, 0, stream>>>(body, p, part.mutable_data_ptr<double>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // part is [N, pieces, C]: out[n, c] sums over pieces.
    sum_partials(part, op, SumPlan{v.n, v.c, p.pieces * v.c, 1, p.pieces, v.c, 1, 0});
  }
}

template <typename scalar_t, bool ABS>
void taylor_elementwise(const at::Tensor& a, const at::Tensor& g, const at::Tensor& out) {
  const int64_t numel = a.numel();
  const int64_t blocks = elementwise_blocks(numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (use_32bit(numel)) {
    taylor_elementwise_kernel<scalar_t, int32_t, ABS><<<blocks, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        static_cast<int32_t>(numel));
  } else {
    taylor_elementwise_kernel<scalar_t, int64_t, ABS><<<blocks, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor taylor_contributions_cuda(const at::Tensor& activation, const at::Tensor& grad,
                                    c10::string_view reduction, bool absolute) {
  check_taylor(activation, grad);
  const bool channel = parse_reduction(std::string(reduction));
  c10::cuda::CUDAGuard device_guard(activation.device());
  const auto fmt = layout_of(activation);
  at::Tensor a = activation.contiguous(fmt);
  at::Tensor g = grad.contiguous(fmt);
  at::Tensor out = channel ? at::empty({a.size(0), a.size(1)}, a.options())
                           : at::empty(a.sizes(), a.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  if (a.numel() == 0) return out.zero_();  // channel sums over empty spatial dims
  const ChannelView v = channel_view(a, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "taylor_contributions_cuda", [&] {
    if (channel) {
      absolute ? taylor_channel<scalar_t, true>(a, g, out, v) : taylor_channel<scalar_t, false>(a, g, out, v);
    } else {
      absolute ? taylor_elementwise<scalar_t, true>(a, g, out) : taylor_elementwise<scalar_t, false>(a, g, out);
    }
  });
  return out;
}

template <typename scalar_t, bool ABS>
void taylor_backward(const at::Tensor& go, const at::Tensor& a, const at::Tensor& g, const at::Tensor& ga,
                     const at::Tensor& gg, const ChannelView& v, GradOut mode) {
  const int64_t numel = a.numel();
  const int64_t blocks = elementwise_blocks(numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (use_32bit(numel)) {
    taylor_backward_kernel<scalar_t, int32_t, ABS><<<blocks, kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        ga.mutable_data_ptr<scalar_t>(), gg.mutable_data_ptr<scalar_t>(), static_cast<int32_t>(numel),
        static_cast<int32_t>(v.c), static_cast<int32_t>(v.s), mode);
  } else {
    taylor_backward_kernel<scalar_t, int64_t, ABS><<<blocks, kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        ga.mutable_data_ptr<scalar_t>(), gg.mutable_data_ptr<scalar_t>(), numel, v.c, v.s, mode);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> taylor_contributions_backward_cuda(const at::Tensor& grad_out,
                                                                     const at::Tensor& activation,
                                                                     const at::Tensor& grad,
                                                                     c10::string_view reduction, bool absolute) {
  check_taylor(activation, grad);
  const bool channel = parse_reduction(std::string(reduction));
  check_same(grad_out, activation, "grad_out", "activation");
  c10::cuda::CUDAGuard device_guard(activation.device());
  const auto fmt = layout_of(activation);
  at::Tensor a = activation.contiguous(fmt);
  at::Tensor g = grad.contiguous(fmt);
  at::Tensor go = channel ? grad_out.contiguous() : grad_out.contiguous(fmt);
  TORCH_CHECK_VALUE(channel ? (go.dim() == 2 && go.size(0) == a.size(0) && go.size(1) == a.size(1))
                            : go.sizes() == a.sizes(),
                    "grad_out has the wrong shape ", go.sizes());
  at::Tensor ga = at::empty(a.sizes(), a.options().memory_format(fmt));
  at::Tensor gg = at::empty(a.sizes(), a.options().memory_format(fmt));
  if (a.numel() == 0) return {ga, gg};
  const ChannelView v = channel_view(a, fmt == at::MemoryFormat::ChannelsLast);
  const GradOut mode = !channel ? GradOut::kElementwise
                                : (v.channels_last ? GradOut::kChannelsLast : GradOut::kPlane);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "taylor_contributions_backward_cuda", [&] {
    absolute ? taylor_backward<scalar_t, true>(go, a, g, ga, gg, v, mode)
             : taylor_backward<scalar_t, false>(go, a, g, ga, gg, v, mode);
  });
  return {ga, gg};
}

}  // namespace
}  // namespace cuda
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CUDA, m) {
  m.impl("taylor_contributions", &nchains::cuda::taylor_contributions_cuda);
  m.impl("_taylor_contributions_backward", &nchains::cuda::taylor_contributions_backward_cuda);
}
