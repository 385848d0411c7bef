// Launch shapes shared by the CUDA kernels: grid-stride elementwise loops and deterministic
// two-pass reductions (per-task partial sums in double, then a fixed-order finalize), so results
// do not depend on scheduling or atomics. The CUDA twin of cpu/loops.h.
//
// Only the light c10/cuda headers are included: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS/
// cuSOLVER headers, which a minimal CUDA toolkit (like this project's build machine) does not have.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/hd.h"
#include "math/epilogue.h"

namespace nchains {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// A reduction task should own at least this many elements of a plane before a plane is split.
constexpr int64_t kPlaneChunk = 4096;
// Rows per thread a channels_last reduction task should own before the rows are split further.
constexpr int64_t kRowsPerThread = 16;

// Multiprocessors of the current device, queried once per device (the query does not sync).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  int n = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

// 32-bit index math when every offset, and every offset plus a grid stride (< 2^30), fits.
inline bool use_32bit(int64_t numel) { return numel <= std::numeric_limits<int32_t>::max() / 2; }

// Blocks of a grid-stride elementwise loop: enough to fill the device, never more than the work.
inline int64_t elementwise_blocks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(numel, kThreads), int64_t(sm_count()) * 16));
}

// Sum over the lanes of each aligned group of `width` lanes (a power of two <= 32); every lane of
// the warp must call it. The result is valid in the group's first lane.
__device__ __forceinline__ double warp_sum(double v, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset, width);
  return v;
}

// Block-wide sum; every thread must call it, blockDim a multiple of 32. Valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_part[kThreads / kWarp];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid % kWarp, warp = tid / kWarp, warps = (blockDim.x * blockDim.y) / kWarp;
  v = warp_sum(v, kWarp);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < warps ? warp_part[lane] : 0.0, kWarp);
  __syncthreads();  // warp_part may be reused by the caller's next call
  return v;
}

// ---------------------------------------------------------------------------------------------
// Per-(n, c) plane reduction of a contiguous [N, C, S] tensor. A task is a chunk of one plane,
// owned by a group of `width` lanes; the task's sum goes to part_c[task] (layout [N, C, splits]).
// The body is a functor with prepare() (per-thread setup, e.g. reading the gate logit) and
// operator()(i, c, acc_c, acc_g), called for element i of channel c.
struct PlanePlan {
  int64_t planes, c, s, splits, chunk, tasks;
  int width;
  int64_t blocks;
};

inline PlanePlan plan_planes(const ChannelView& v) {
  PlanePlan p{};
  p.planes = v.n * v.c;
  p.c = v.c;
  p.s = v.s;
  p.width = next_pow2(v.s, kWarp);
  // Split large planes only when there are too few planes to fill the device.
  const int64_t want_tasks = int64_t(sm_count()) * 128;
  p.splits = 1;
  if (v.s > kPlaneChunk) {
    p.splits = std::max<int64_t>(1, std::min<int64_t>(ceil_div(v.s, kPlaneChunk), want_tasks / std::max<int64_t>(1, p.planes)));
  }
  p.chunk = std::max<int64_t>(1, ceil_div(v.s, p.splits));
  p.tasks = p.planes * p.splits;
  const int64_t tasks_per_block = (kThreads / kWarp) * (kWarp / p.width);
  p.blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(p.tasks, tasks_per_block), int64_t(sm_count()) * 8));
  return p;
}

template <bool GLOBAL, typename Body>
__global__ void __launch_bounds__(kThreads)
    plane_reduce_kernel(Body body, PlanePlan p, double* __restrict__ part_c, double* __restrict__ part_g) {
  Body b = body;
  b.prepare();
  const int lane = threadIdx.x % kWarp;
  const int width = p.width;
  const int sub = lane % width, group = lane / width, groups = kWarp / width;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) / kWarp;
  double acc_g = 0.0;
  // `base` is uniform across the warp, so every lane reaches the shuffles.
  for (int64_t base = warp * groups; base < p.tasks; base += warps * groups) {
    const int64_t t = base + group;
    double acc = 0.0;
    if (t < p.tasks) {
      const int64_t plane = t / p.splits;
      const int64_t lo = (t - plane * p.splits) * p.chunk;
      const int64_t hi = lo + p.chunk < p.s ? lo + p.chunk : p.s;
      const int64_t c = plane % p.c;
      const int64_t off = plane * p.s;
      for (int64_t j = lo + sub; j < hi; j += width) b(off + j, c, acc, acc_g);
    }
    acc = warp_sum(acc, width);
    if (t < p.tasks && sub == 0) part_c[t] = acc;
  }
  if constexpr (GLOBAL) {
    acc_g = block_sum(acc_g);
    if (threadIdx.x == 0) part_g[blockIdx.x] = acc_g;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel reduction of a channels_last [N, S, C] tensor. threadIdx.x walks channels (coalesced),
// threadIdx.y strides over the rows of a task; a task is a chunk of one sample's rows and its sums
// go to part_c[task * C + c] (layout [N, pieces, C]).
struct RowsPlan {
  int64_t n, s, c, pieces, chunk, tasks;
  dim3 block, grid;
};

inline RowsPlan plan_rows(const ChannelView& v) {
  RowsPlan p{};
  p.n = v.n;
  p.s = v.s;
  p.c = v.c;
  const int bx = next_pow2(v.c, kWarp), by = kThreads / bx;
  const int64_t gx = ceil_div(v.c, bx);
  const int64_t want_blocks = int64_t(sm_count()) * 8;
  const int64_t max_pieces = std::max<int64_t>(1, ceil_div(v.s, int64_t(by) * kRowsPerThread));
  p.pieces = std::clamp<int64_t>(ceil_div(want_blocks, gx * std::max<int64_t>(1, v.n)), 1, max_pieces);
  p.chunk = std::max<int64_t>(1, ceil_div(v.s, p.pieces));
  p.pieces = std::max<int64_t>(1, ceil_div(v.s, p.chunk));
  p.tasks = v.n * p.pieces;
  p.block = dim3(bx, by);
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(std::min<int64_t>(p.tasks, 65535)));
  return p;
}

template <bool GLOBAL, typename Body>
__global__ void __launch_bounds__(kThreads)
    rows_reduce_kernel(Body body, RowsPlan p, double* __restrict__ part_c, double* __restrict__ part_g) {
  __shared__ double tile[kThreads];
  Body b = body;
  b.prepare();
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t c = int64_t(blockIdx.x) * bx + tx;
  const bool has_c = c < p.c;
  double acc_g = 0.0;
  for (int64_t t = blockIdx.y; t < p.tasks; t += gridDim.y) {  // uniform across the block
    const int64_t n = t / p.pieces;
    const int64_t r0 = (t - n * p.pieces) * p.chunk;
    const int64_t r1 = r0 + p.chunk < p.s ? r0 + p.chunk : p.s;
    double acc = 0.0;
    if (has_c) {
      for (int64_t r = r0 + ty; r < r1; r += by) b((n * p.s + r) * p.c + c, c, acc, acc_g);
    }
    tile[ty * bx + tx] = acc;
    __syncthreads();
    for (int h = by / 2; h > 0; h >>= 1) {
      if (ty < h) tile[ty * bx + tx] += tile[(ty + h) * bx + tx];
      __syncthreads();
    }
    if (ty == 0 && has_c) part_c[t * p.c + c] = tile[tx];
    __syncthreads();
  }
  if constexpr (GLOBAL) {
    acc_g = block_sum(acc_g);
    if (tx == 0 && ty == 0) part_g[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = acc_g;
  }
}

// ---------------------------------------------------------------------------------------------
// Finalize: out[q] (q = a * B + b) = sum over (o1, o2) of part[a*sa + b*sb + o1*so1 + o2*so2],
// one warp per output, fixed summation order.
struct SumPlan {
  int64_t a, b, sa, sb, o1, so1, o2, so2;
};

template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* __restrict__ part, out_t* __restrict__ out, SumPlan p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) / kWarp;
  const int64_t outputs = p.a * p.b, terms = p.o1 * p.o2;
  for (int64_t q = warp; q < outputs; q += warps) {  // uniform across the warp
    const int64_t qa = q / p.b;
    const double* base = part + qa * p.sa + (q - qa * p.b) * p.sb;
    double acc = 0.0;
    for (int64_t m = lane; m < terms; m += kWarp) {
      const int64_t i1 = m / p.o2;
      acc += base[i1 * p.so1 + (m - i1 * p.o2) * p.so2];
    }
    acc = warp_sum(acc, kWarp);
    if (lane == 0) out[q] = static_cast<out_t>(acc);
  }
}

template <typename out_t>
void sum_partials(const at::Tensor& part, out_t* out, const SumPlan& p) {
  const int64_t outputs = p.a * p.b;
  if (outputs == 0) return;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(outputs, kThreads / kWarp), int64_t(sm_count()) * 16));
  sum_partials_kernel<out_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      part.const_data_ptr<double>(), out, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// grad of the gate logit from the partial sums of dL/dG, without leaving the device:
// out = sum(part_g) * dG/dalpha, G read from the 0-d logit. DVALUE_SCALAR picks where dG/dalpha is
// evaluated (scalar_t like the gate op's CPU kernel, or double like masked_conv2d's).
template <typename scalar_t, bool DVALUE_SCALAR>
__global__ void __launch_bounds__(kThreads)
    gate_grad_kernel(const double* __restrict__ part_g, int64_t parts, const scalar_t* __restrict__ logit,
                     double temperature, scalar_t* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) acc += part_g[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const scalar_t g = math::gate_value<scalar_t>(*logit, scalar_t(temperature));
    const double dvalue = DVALUE_SCALAR ? static_cast<double>(math::gate_dvalue<scalar_t>(g, scalar_t(temperature)))
                                        : math::gate_dvalue<double>(static_cast<double>(g), temperature);
    *out = static_cast<scalar_t>(acc * dvalue);
  }
}

template <typename scalar_t, bool DVALUE_SCALAR>
void gate_grad(const at::Tensor& part_g, const at::Tensor& logit, double temperature, const at::Tensor& out) {
  gate_grad_kernel<scalar_t, DVALUE_SCALAR><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      part_g.const_data_ptr<double>(), part_g.numel(), logit.const_data_ptr<scalar_t>(), temperature,
      out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace nchains
