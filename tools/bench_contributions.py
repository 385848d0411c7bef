"""Benchmark of nchains.contributions against one forward+backward and against Captum.

torchvision ResNet-50 (random init, eval), a batch of 8 x 3 x 224 x 224, 2 intra-op threads.
Every timed method runs once per repeat, the methods alternating within a repeat (so a load
change on the machine hits all of them alike); the table gives the median over the repeats.

Rows:
  fwd+bwd (weights)     model forward, backward of the summed target logits to every weight
  fwd+bwd (input only)  the same, weights frozen: the gradient w.r.t. the input only (the
                        physical floor of any all-layer gradient x activation)
  taylor ours, activations   nchains.contributions(method="taylor"), every ReLU call (49 sites)
  taylor ours, convs         the same on the outputs of every conv (53 sites), neuron unit
  captum GxA, convs          captum LayerGradientXActivation given the list of every conv
  taylor ours, units         every conv(+BN)(+ReLU) unit output, channel unit
  intgrad ours / captum LIG  a few conv layers (--ig-layers, evenly spread from conv1 to the last), --ig-steps steps,
                        --ig-images images: ours (prefix once, batched suffix) against a loop of
                        captum LayerIntegratedGradients, one per layer (all steps in one batch
                        for both). Captum's baseline is the layer's value at a zero input, ours
                        a zero activation: the same work, not the same numbers.

Peak memory (--memory, default on): each method once more in a fresh Python process; the
column is the peak resident set size during the call (VmHWM of /proc/self/status, reset through
/proc/self/clear_refs just before it) minus the resident size just before the call, so the model,
the inputs, the analysis and the setup's forwards are not counted (Linux only).
--memory-only prints that column alone (no timing).

Usage:
    python tools/bench_contributions.py [--repeats 5] [--images 8] [--size 224] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _setup(args):
    import torchvision

    from nchains.graph.analysis import analyze

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(args.images, 3, args.size, args.size)
    t0 = time.perf_counter()
    graph = analyze(model, x[:1])
    analysis_s = time.perf_counter() - t0
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, graph, convs, target, analysis_s


def _methods(model, x, graph, convs, target, args):
    """name -> zero-argument callable running the method once."""
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    from nchains.contrib import contributions

    xi = x[:args.ig_images]
    ti = target[:args.ig_images]
    # spread over the depth (early layers have long suffixes, late ones short)
    ig_layers = [convs[round(i * (len(convs) - 1) / max(1, args.ig_layers - 1))] for i in range(args.ig_layers)]
    rows = args.ig_steps * len(xi)

    def fwd_bwd_weights():
        model.zero_grad(set_to_none=True)
        model(x).gather(1, target[:, None]).sum().backward()

    def fwd_bwd_input():
        inp = x.clone().requires_grad_(True)
        params = [p.requires_grad_(False) for p in model.parameters()]
        try:
            torch.autograd.grad(model(inp).gather(1, target[:, None]).sum(), inp)
        finally:
            for p in params:
                p.requires_grad_(True)

    gxa = LayerGradientXActivation(model, [model.get_submodule(n) for n in convs])

    def captum_gxa():
        inp = x.clone().requires_grad_(True)
        return gxa.attribute(inp, target=target)

    def captum_lig():
        out = []
        for name in ig_layers:
            lig = LayerIntegratedGradients(model, model.get_submodule(name))
            out.append(lig.attribute(xi, target=ti, n_steps=args.ig_steps, method="riemann_middle",
                                     internal_batch_size=rows))
        return out

    return {
        "fwd+bwd (weights)": fwd_bwd_weights,
        "fwd+bwd (input only)": fwd_bwd_input,
        "taylor ours, activations": lambda: contributions(model, x, target=target, graph=graph),
        "taylor ours, convs": lambda: contributions(model, x, target=target, graph=graph, layers=convs,
                                                    unit="neuron"),
        "captum GxA, convs": captum_gxa,
        "taylor ours, units": lambda: contributions(model, x, target=target, graph=graph, layers="units"),
        "intgrad ours": lambda: contributions(model, xi, target=ti, graph=graph, layers=ig_layers, method="intgrad",
                                              steps=args.ig_steps, batch_size=rows),
        "intgrad captum LIG loop": captum_lig,
    }


def _child(args) -> None:
    """One method once in this fresh process; prints its peak memory above the start (MB)."""
    torch.set_num_threads(args.threads)
    model, x, graph, convs, target, _ = _setup(args)
    run = _methods(model, x, graph, convs, target, args)[args.child]
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) left by the setup's forwards
        f.write("5")
    before = _rss_mb()
    run()
    print(json.dumps({"peak_mb": _status_mb("VmHWM") - before}))


def _peak(args, name: str) -> float:
    argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--images", str(args.images), "--size",
            str(args.size), "--threads", str(args.threads), "--ig-images", str(args.ig_images), "--ig-steps",
            str(args.ig_steps), "--ig-layers", str(args.ig_layers)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ig-images", dest="ig_images", type=int, default=2)
    p.add_argument("--ig-steps", dest="ig_steps", type=int, default=8)
    p.add_argument("--ig-layers", dest="ig_layers", type=int, default=3)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-only", dest="memory_only", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    if args.memory_only:
        for name in ("fwd+bwd (weights)", "fwd+bwd (input only)", "taylor ours, activations", "taylor ours, convs",
                     "captum GxA, convs", "taylor ours, units", "intgrad ours", "intgrad captum LIG loop"):
            print(f"{name:<26} peak {_peak(args, name):8.0f} MB")
        return None
    torch.set_num_threads(args.threads)
    model, x, graph, convs, target, analysis_s = _setup(args)
    methods = _methods(model, x, graph, convs, target, args)
    for run in methods.values():  # warm-up: allocator, oneDNN primitives, captum hooks
        run()
    times = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = {name: _peak(args, name) for name in methods} if args.memory else {}
    base, floor = med["fwd+bwd (weights)"], med["fwd+bwd (input only)"]
    load = os.getloadavg()
    print(f"ResNet-50 (random init), {args.images}x3x{args.size}x{args.size}, {args.threads} threads, median of "
          f"{args.repeats} alternating repeats; intgrad: {args.ig_layers} convs spread over the depth, "
          f"{args.ig_steps} steps, {args.ig_images} images; analysis (once, not timed below) {analysis_s:.2f} s; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    head = f"{'method':<26} {'median s':>9} {'min s':>7} {'/fwd+bwd':>9} {'/input-only':>12} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for name, t in med.items():
        peak = f"{peaks[name]:8.0f}" if name in peaks else f"{'-':>8}"
        print(f"{name:<26} {t:9.3f} {min(times[name]):7.3f} {t / base:9.2f} {t / floor:12.2f} {peak}")
    print(f"\ncaptum GxA / ours on the same conv sites: {med['captum GxA, convs'] / med['taylor ours, convs']:.2f}x; "
          f"captum LIG loop / ours intgrad: {med['intgrad captum LIG loop'] / med['intgrad ours']:.2f}x")


if __name__ == "__main__":
    main()
