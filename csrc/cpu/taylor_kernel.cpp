// CPU kernels of taylor_contributions: a * g (or |a * g|), elementwise or summed per channel in
// one pass without materialising a * g.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/loops.h"
#include "math/epilogue.h"

namespace nchains {
namespace cpu {
namespace {

template <typename scalar_t, bool ABS>
void taylor_channel(const scalar_t* a, const scalar_t* g, scalar_t* out, const ChannelView& v) {
  if (!v.channels_last) {
    parallel_planes(v.n * v.c, v.s, [&](int64_t p) {
      const scalar_t* ap = a + p * v.s;
      const scalar_t* gp = g + p * v.s;
      double acc = 0.0;
NC_PRAGMA(omp simd reduction(+ : acc))
      for (int64_t i = 0; i < v.s; ++i) acc += static_cast<double>(math::taylor<ABS>(ap[i], gp[i]));
      out[p] = static_cast<scalar_t>(acc);
    });
    return;
  }
  int64_t pieces = 0;
  const int64_t c_n = v.c;
  auto partial = channels_last_reduce(v, c_n, pieces, [&](int64_t n, int64_t r0, int64_t r1, double* acc) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t off = (n * v.s + r) * c_n;
NC_PRAGMA(omp simd)
      for (int64_t c = 0; c < c_n; ++c) acc[c] += static_cast<double>(math::taylor<ABS>(a[off + c], g[off + c]));
    }
  });
  for (int64_t n = 0; n < v.n; ++n) {
    for (int64_t c = 0; c < c_n; ++c) {
      double total = 0.0;
      for (int64_t piece = 0; piece < pieces; ++piece) total += partial[(n * pieces + piece) * c_n + c];
      out[n * c_n + c] = static_cast<scalar_t>(total);
    }
  }
}

template <typename scalar_t, bool ABS>
void taylor_elementwise(const scalar_t* a, const scalar_t* g, scalar_t* out, int64_t numel) {
  parallel_range(numel, [&](int64_t begin, int64_t end) {
NC_PRAGMA(omp simd)
    for (int64_t i = begin; i < end; ++i) out[i] = math::taylor<ABS>(a[i], g[i]);
  });
}

at::Tensor taylor_contributions_cpu(const at::Tensor& activation, const at::Tensor& grad,
                                   c10::string_view reduction, bool absolute) {
  check_taylor(activation, grad);
  const bool channel = parse_reduction(std::string(reduction));
  const auto fmt = layout_of(activation);
  at::Tensor a = activation.contiguous(fmt);
  at::Tensor g = grad.contiguous(fmt);
  at::Tensor out = channel ? at::empty({a.size(0), a.size(1)}, a.options())
                           : at::empty(a.sizes(), a.options().memory_format(fmt));
  const ChannelView v = channel_view(a, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "taylor_contributions_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (channel) {
      absolute ? taylor_channel<scalar_t, true>(ap, gp, op, v) : taylor_channel<scalar_t, false>(ap, gp, op, v);
    } else {
      absolute ? taylor_elementwise<scalar_t, true>(ap, gp, op, a.numel())
               : taylor_elementwise<scalar_t, false>(ap, gp, op, a.numel());
    }
  });
  return out;
}

// d/da and d/dg of sum(grad_out * taylor(a, g)); grad_out is [N, C] (broadcast over the spatial
// dims) for the channel reduction, else elementwise.
template <typename scalar_t, bool ABS>
void taylor_backward(const scalar_t* go, const scalar_t* a, const scalar_t* g, scalar_t* ga, scalar_t* gg,
                     const ChannelView& v, bool channel) {
  if (!channel) {
    parallel_range(v.n * v.c * v.s, [&](int64_t begin, int64_t end) {
NC_PRAGMA(omp simd)
      for (int64_t i = begin; i < end; ++i) {
        ga[i] = math::taylor_dfirst<ABS>(go[i], a[i], g[i]);
        gg[i] = math::taylor_dfirst<ABS>(go[i], g[i], a[i]);
      }
    });
    return;
  }
  if (!v.channels_last) {
    parallel_planes(v.n * v.c, v.s, [&](int64_t p) {
      const scalar_t gop = go[p];
      const int64_t off = p * v.s;
NC_PRAGMA(omp simd)
      for (int64_t i = off; i < off + v.s; ++i) {
        ga[i] = math::taylor_dfirst<ABS>(gop, a[i], g[i]);
        gg[i] = math::taylor_dfirst<ABS>(gop, g[i], a[i]);
      }
    });
    return;
  }
  const int64_t c_n = v.c;
  at::parallel_for(0, v.n * v.s, std::max<int64_t>(1, kGrain / c_n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gop = go + (r / v.s) * c_n;
      const int64_t off = r * c_n;
NC_PRAGMA(omp simd)
      for (int64_t c = 0; c < c_n; ++c) {
        ga[off + c] = math::taylor_dfirst<ABS>(gop[c], a[off + c], g[off + c]);
        gg[off + c] = math::taylor_dfirst<ABS>(gop[c], g[off + c], a[off + c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> taylor_contributions_backward_cpu(const at::Tensor& grad_out,
                                                                    const at::Tensor& activation,
                                                                    const at::Tensor& grad, c10::string_view reduction,
                                                                    bool absolute) {
  check_taylor(activation, grad);
  const bool channel = parse_reduction(std::string(reduction));
  check_same(grad_out, activation, "grad_out", "activation");
  const auto fmt = layout_of(activation);
  at::Tensor a = activation.contiguous(fmt);
  at::Tensor g = grad.contiguous(fmt);
  at::Tensor go = channel ? grad_out.contiguous() : grad_out.contiguous(fmt);
  TORCH_CHECK_VALUE(channel ? (go.dim() == 2 && go.size(0) == a.size(0) && go.size(1) == a.size(1))
                            : go.sizes() == a.sizes(),
                    "grad_out has the wrong shape ", go.sizes());
  at::Tensor ga = at::empty(a.sizes(), a.options().memory_format(fmt));
  at::Tensor gg = at::empty(a.sizes(), a.options().memory_format(fmt));
  const ChannelView v = channel_view(a, fmt == at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "taylor_contributions_backward_cpu", [&] {
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
    scalar_t* ggp = gg.mutable_data_ptr<scalar_t>();
    absolute ? taylor_backward<scalar_t, true>(gop, ap, gp, gap, ggp, v, channel)
             : taylor_backward<scalar_t, false>(gop, ap, gp, gap, ggp, v, channel);
  });
  return {ga, gg};
}

}  // namespace
}  // namespace cpu
}  // namespace nchains

TORCH_LIBRARY_IMPL(nchains, CPU, m) {
  m.impl("taylor_contributions", &nchains::cpu::taylor_contributions_cpu);
  m.impl("_taylor_contributions_backward", &nchains::cpu::taylor_contributions_backward_cpu);
}
