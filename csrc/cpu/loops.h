// Parallel loop shapes shared by the CPU kernels. Reductions are split into a fixed number of
// chunks with per-chunk partial sums, so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/hd.h"

namespace nchains {
namespace cpu {

// Elements a task should own before it is worth a thread.
constexpr int64_t kGrain = 16384;
// Upper bound on reduction chunks: enough to feed the threads, fixed so sums are reproducible.
constexpr int64_t kMaxChunks = 64;

// fn(plane) for each of `planes` contiguous planes of `plane_size` elements.
template <typename F>
void parallel_planes(int64_t planes, int64_t plane_size, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, plane_size));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) fn(p);
  });
}

// fn(begin, end) over a flat index range.
template <typename F>
void parallel_range(int64_t numel, const F& fn) {
  at::parallel_for(0, numel, kGrain, fn);
}

// Splits each sample's S rows of a channels_last [N, S, C] tensor into `pieces` chunks and calls
// fn(n, row_begin, row_end, acc) with acc a zeroed double[width] owned by that chunk. Returns the
// partial sums laid out as [N, pieces, width] and sets `pieces`.
template <typename F>
std::vector<double> channels_last_reduce(const ChannelView& v, int64_t width, int64_t& pieces, const F& fn) {
  const int64_t rows_per_piece = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, v.c));
  const int64_t want = std::max<int64_t>(1, kMaxChunks / std::max<int64_t>(1, v.n));
  pieces = std::max<int64_t>(1, std::min<int64_t>(want, (v.s + rows_per_piece - 1) / rows_per_piece));
  std::vector<double> partial(static_cast<size_t>(v.n * pieces * width), 0.0);
  const int64_t chunk = (v.s + pieces - 1) / pieces;
  const int64_t np = pieces;
  at::parallel_for(0, v.n * np, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / np, piece = t % np;
      const int64_t r0 = std::min(v.s, piece * chunk), r1 = std::min(v.s, r0 + chunk);
      fn(n, r0, r1, partial.data() + t * width);
    }
  });
  return partial;
}

// Parallel sum of fn(begin, end) -> double over a flat range, deterministic in chunking.
template <typename F>
double parallel_sum(int64_t numel, const F& fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((numel + kGrain - 1) / kGrain, kMaxChunks));
  const int64_t chunk = (numel + chunks - 1) / chunks;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = std::min(numel, t * chunk), e = std::min(numel, b + chunk);
      partial[t] = fn(b, e);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace cpu
}  // namespace nchains
