"""Benchmark the fused ops against their PyTorch composites at ResNet-50 layer shapes.

Prints a table of median times (after warm-up) for forward and forward+backward, fused vs the
composite (conv2d, mul, relu, blend, reductions); and taylor_contributions vs
``(a * g).sum((2, 3))``. Fused and composite runs are interleaved: every repeat runs each once,
alternating which goes first, so drifts of the machine's state (clock, caches, other load) hit
both alike; each cell is the median over the repeats.

NeuroChains' setting: weights frozen, gradients wanted for the input, scores and gate logit.

Usage: python tools/bench_ops.py [--batch 20] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List

import torch

from nchains.ops import _reference as ref
from nchains import ops

# (name, C_in, C_out, kernel, stride, padding, H_in, gated) at 224x224 input resolution.
RESNET50_LAYERS = [
    ("conv1 7x7/2", 3, 64, 7, 2, 3, 224, False),
    ("layer1 3x3 (gated)", 64, 64, 3, 1, 1, 56, True),
    ("layer1 1x1 64->256", 64, 256, 1, 1, 0, 56, False),
    ("layer2 3x3 (gated)", 128, 128, 3, 1, 1, 28, True),
    ("layer3 1x1 1024->256", 1024, 256, 1, 1, 0, 14, False),
    ("layer3 3x3 (gated)", 256, 256, 3, 1, 1, 14, True),
    ("layer4 1x1 512->2048", 512, 2048, 1, 1, 0, 7, False),
]


def _interleaved_medians(fns, repeats: int, warmup: int = 2) -> List[float]:
    """Median seconds of each of ``fns``, timed in alternation: repeat ``r`` runs them in order
    (even ``r``) or reversed (odd ``r``), so that neither side always runs first or second."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _conv_case(batch, cin, cout, k, stride, pad, h, gated, relu=True):
    x = torch.randn(batch, cin, h, h, requires_grad=True)
    w = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
    b = torch.randn(cout) * 0.1
    s = torch.ones(cout, requires_grad=True)
    a = torch.zeros((), requires_grad=True) if gated else None
    kw = dict(stride=stride, padding=pad, activation="relu" if relu else "none", gate_logit=a)
    leaves = [t for t in (x, s, a) if t is not None]

    def fused():
        return ops.masked_conv2d(x, w, b, s, **kw)

    def composite():
        return ref.masked_conv2d(x, w, b, s, **kw)

    def fwd_bwd(f):
        def run():
            out = f()
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        return run

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    return fwd(fused), fwd(composite), fwd_bwd(fused), fwd_bwd(composite)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=20, help="batch size (default 20)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cell, median reported (>= 5)")
    parser.add_argument("--quick", action="store_true", help="batch 2 and 3 repeats: a smoke run, not a benchmark")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 2, 3
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats} interleaved repeats after warm-up, float32, CPU")
    header = (f"{'layer':<24}{'fwd fused':>11}{'fwd comp':>11}{'ratio':>7}"
              f"{'f+b fused':>12}{'f+b comp':>11}{'ratio':>7}")
    print(header)
    print("-" * len(header))
    ratios = []
    for name, cin, cout, k, stride, pad, h, gated in RESNET50_LAYERS:
        f_fwd, c_fwd, f_fb, c_fb = _conv_case(args.batch, cin, cout, k, stride, pad, h, gated)
        tf, tc = _interleaved_medians([f_fwd, c_fwd], args.repeats)
        tfb, tcb = _interleaved_medians([f_fb, c_fb], args.repeats)
        ratios.append(tcb / tfb)
        print(f"{name:<24}{tf * 1e3:>9.2f}ms{tc * 1e3:>9.2f}ms{tc / tf:>6.2f}x"
              f"{tfb * 1e3:>10.2f}ms{tcb * 1e3:>9.2f}ms{tcb / tfb:>6.2f}x")
    print(f"geometric-mean fwd+bwd speedup: {statistics.geometric_mean(ratios):.2f}x")
    print()
    header = f"{'taylor_contributions':<34}{'fused':>10}{'(a*g).sum':>12}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, c, h in [("layer1 256x56x56", 256, 56), ("layer3 1024x14x14", 1024, 14), ("layer4 2048x7x7", 2048, 7)]:
        for layout in ("contiguous", "channels_last"):
            a = torch.randn(args.batch, c, h, h)
            g = torch.randn(args.batch, c, h, h)
            if layout == "channels_last":
                a, g = (t.contiguous(memory_format=torch.channels_last) for t in (a, g))
            tf, tc = _interleaved_medians([lambda: ops.taylor_contributions(a, g), lambda: (a * g).sum((2, 3))],
                                          args.repeats)
            print(f"{name + ' ' + layout:<34}{tf * 1e3:>8.2f}ms{tc * 1e3:>10.2f}ms{tc / tf:>7.2f}x")


if __name__ == "__main__":
    main()
