"""Benchmark of step-wise sensitivity analysis (``nchains.ssa``); prints a table.

1. The shipped model (zoo.default_model()), every class x ``--per-class`` images of the shipped
   sample (default 100, confident=None: the whole 1000-image sample), b = 3: wall and CPU time,
   process peak RSS.
2. The naive per-(neuron, image) loop on a subset (``--naive-classes`` x ``--naive-images``): one
   forward of the step's segment and one backward per upper neuron and image (the producers'
   outputs still computed once, which favours the naive side); the dependency graphs are
   checked equal to nchains' on that subset, and the speed-up is of the relevance computation
   (both sides run the same Tukey/ranking code). The naive time of the whole run of 1 is
   extrapolated per upper unit: the subset's naive seconds per (neuron, image) pair of that
   unit's step (its cost is linear in the pairs and differs from unit to unit) times the
   pairs the whole run differentiates at that unit (a unit the subset never visits takes the
   subset's average per-pair cost). One average over all the subset's pairs would weigh the
   steps by the subset's mix, not the whole run's.
3. torchvision ResNet-50 (random init, 224 x 224, ``--r50-images`` random images): a partial
   run of ``--r50-seconds`` seconds; the remaining steps are estimated from the measured cost
   per (neuron x image x producer value) of the steps done, assuming every remaining unit keeps
   min(its width, the largest set seen so far) neurons.

Usage: ``python tools/bench_ssa.py [--per-class 100] [--threads N] [--quick]``. Run it on idle
cores: while other jobs shared the 2 cores, 2 threads made the shipped run 20x slower than 1
thread (each parallel op waits for its descheduled thread), the narrowed steps most.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

import nchains
from nchains.models import zoo
from nchains.ssa import analysis
from nchains.ssa.step import _reduce, response_of


def naive_relevance(step, images, lower_outputs, neurons, response="mean"):
    """Same contract as nchains.ssa.step.step_relevance, one VJP per (neuron, image)."""
    names = list(lower_outputs)
    out = {n: [] for n in names}
    for n in neurons:
        rows = {name: [] for name in names}
        for i in range(len(images)):
            with torch.enable_grad():
                leaves = [v[i:i + 1].detach().requires_grad_(True) for v in lower_outputs.values()]
                resp = response_of(step(images[i:i + 1], *leaves), torch.tensor([n]), response)
                grads = torch.autograd.grad(resp.sum(), leaves, allow_unused=True, materialize_grads=True)
            for name, g in zip(names, grads):
                rows[name].append(_reduce(g[None])[0, 0])
        for name in names:
            out[name].append(torch.stack(rows[name]))
    return {name: torch.stack(v) for name, v in out.items()}


def _step_key(step) -> str:
    """The upper unit of a step graph (its output node's name): the same across graphs."""
    return next(n for n in reversed(step.graph.nodes) if n.op == "output").args[0].name


class _Timed:
    """Wraps analysis.step_relevance: seconds spent in it, steps (upper unit's key, neurons,
    images, producers' size, seconds) seen."""

    def __init__(self, fn, stop_after=None):
        self.fn, self.seconds, self.cpu, self.stop_after, self.steps = fn, 0.0, 0.0, stop_after, []
        self.start = None  # the first step starts the clock: at least one step is timed

    def __call__(self, step, images, values, neurons, response="mean"):
        self.start = self.start or time.perf_counter()
        if self.stop_after is not None and time.perf_counter() - self.start > self.stop_after:
            raise TimeoutError
        t, c = time.perf_counter(), time.process_time()
        out = self.fn(step, images, values, neurons, response)
        dt = time.perf_counter() - t
        self.seconds += dt
        self.cpu += time.process_time() - c
        size = sum(v[0].numel() for v in values.values())
        self.steps.append((_step_key(step), len(neurons), len(images), size, dt))
        return out

    def pairs(self) -> int:
        return sum(m * n for _, m, n, _, _ in self.steps)

    def per_pair(self) -> dict:
        """Seconds per (neuron, image) pair of each upper unit's step ("" for all of them)."""
        seconds, pairs = {"": 0.0}, {"": 0}
        for key, m, n, _, dt in self.steps:
            for k in (key, ""):
                seconds[k] = seconds.get(k, 0.0) + dt
                pairs[k] = pairs.get(k, 0) + m * n
        return {k: seconds[k] / max(1, pairs[k]) for k in seconds}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shipped(per_class: int):
    model, names = zoo.default_model(), zoo.default_class_names()
    graph, rows = None, []
    timed = _Timed(analysis.step_relevance)
    analysis.step_relevance = timed
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for t, name in enumerate(names):
            images, _, _ = zoo.default_images([name], per_class=per_class, confident=None)
            graph = graph or nchains.analyze(model, images[:1])
            g = nchains.ssa(model, images, target=t, branching=3, graph=graph, class_name=name)
            rows.append((name, len(g.nodes), len(g.edges)))
    finally:
        analysis.step_relevance = timed.fn
    return time.perf_counter() - t0, time.process_time() - c0, rows, timed.seconds, timed


def naive_vs_batched(classes: int, n_images: int):
    model, names = zoo.default_model(), zoo.default_class_names()
    graph = None
    sides = {}
    for label, fn in (("nchains", analysis.step_relevance), ("naive", naive_relevance)):
        timed = _Timed(fn)
        analysis.step_relevance = timed
        try:
            graphs = []
            for t in range(classes):
                images, _, _ = zoo.default_images([names[t]], per_class=n_images, confident=None)
                graph = graph or nchains.analyze(model, images[:1])
                graphs.append(nchains.ssa(model, images, target=t, graph=graph))
        finally:
            analysis.step_relevance = timed.fn
        sides[label] = (timed.seconds, timed.cpu, graphs, timed)
    same = all(a.nodes == b.nodes and a.edges == b.edges for a, b in zip(sides["nchains"][2], sides["naive"][2]))
    return sides["nchains"][:2], sides["naive"][:2], same, sides["naive"][3].per_pair()


def naive_extrapolated(whole: "_Timed", per_pair: dict) -> float:
    """Naive seconds for the whole run's steps: each unit's pairs at that unit's per-pair cost."""
    return sum(per_pair.get(key, per_pair[""]) * m * n for key, m, n, _, _ in whole.steps)


def resnet50_estimate(n_images: int, seconds: float):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(n_images, 3, 224, 224)
    graph = nchains.analyze(model, x[:1])
    timed = _Timed(analysis.step_relevance, stop_after=seconds)
    analysis.step_relevance = timed
    t0 = time.perf_counter()
    done = True
    try:
        nchains.ssa(model, x, target=0, graph=graph)
    except TimeoutError:
        done = False
    finally:
        analysis.step_relevance = timed.fn
    elapsed = time.perf_counter() - t0
    visited = len(timed.steps)
    if done:
        return elapsed, elapsed, visited, len(graph.dag.order), True
    cost = sum(dt for *_, dt in timed.steps) / max(1, sum(m * n * s for _, m, n, s, _ in timed.steps))
    biggest = max(m for _, m, *_ in timed.steps)
    rest = 0.0
    units = list(reversed(graph.dag.order))[visited:]
    for name in units:
        lowers = graph.dag.producers(name)
        if not lowers:
            continue
        unit = graph.units[name]
        m = min(getattr(unit, "out_channels", None) or unit.out_features, biggest)
        size = sum(math.prod(graph.units[lo].output_shape[1:]) for lo in lowers)
        rest += cost * m * n_images * size
    return elapsed, elapsed + rest, visited, len(graph.dag.order), False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--naive-classes", type=int, default=1)
    p.add_argument("--naive-images", type=int, default=10)
    p.add_argument("--r50-images", type=int, default=4)
    p.add_argument("--r50-seconds", type=float, default=120.0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own; on cores other jobs share, 2 threads "
                        "ran SSA up to 20x slower than 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.quick:
        args.per_class, args.naive_images, args.r50_images, args.r50_seconds = 2, 2, 1, 5.0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    wall, cpu, rows, rel_seconds, whole = shipped(args.per_class)
    ours, naive, same, per_pair = naive_vs_batched(args.naive_classes, args.naive_images)
    pairs, naive_whole = whole.pairs(), naive_extrapolated(whole, per_pair)
    r_done, r_total, visited, units, finished = resnet50_estimate(args.r50_images, args.r50_seconds)
    print(f"\n{'run':<58} {'result':>24}")
    print(f"{f'shipped model, 10 classes x {args.per_class} images, b=3: wall':<58} {wall:>22.1f} s")
    print(f"{'  CPU time (all threads)':<58} {cpu:>22.1f} s")
    print(f"{'  peak RSS of the process':<58} {_rss_mib():>20.0f} MiB")
    print(f"{'  nodes / edges per class':<58} {' '.join(f'{n}/{e}' for _, n, e in rows):>24}")
    print(f"{'  of which relevance (STEP 1), wall':<58} {rel_seconds:>22.1f} s")
    print(f"{'  (upper neuron, image) pairs differentiated':<58} {pairs:>24d}")
    print(f"{'  naive per-pair VJPs for them, extrapolated per unit (wall)':<58} {naive_whole / 60:>20.1f} min")
    print(f"{'  speed-up of STEP 1 on the whole run, extrapolated':<58} {naive_whole / max(rel_seconds, 1e-9):>23.0f}x")
    print(f"{'    (one average per-pair cost instead, the old estimate)':<58} "
          f"{per_pair[''] * pairs / max(rel_seconds, 1e-9):>23.0f}x")
    sub = f"{args.naive_classes} class(es) x {args.naive_images} images"
    print(f"{f'relevance wall / CPU, {sub}: nchains':<58} {ours[0]:>9.2f} s / {ours[1]:>9.2f} s")
    print(f"{f'relevance wall / CPU, {sub}: naive per (neuron, image)':<58} {naive[0]:>9.2f} s / {naive[1]:>9.2f} s")
    print(f"{'  speed-up (wall / CPU)':<58} {naive[0] / max(ours[0], 1e-9):>10.1f}x / "
          f"{naive[1] / max(ours[1], 1e-9):>10.1f}x")
    print(f"{'  same dependency graphs':<58} {'yes' if same else 'NO':>24}")
    what = "measured" if finished else f"estimated ({visited}/{units} units timed)"
    print(f"{f'ResNet-50 224x224, {args.r50_images} images, b=3: partial run':<58} {r_done:>22.1f} s")
    print(f"{f'  whole network, {what}':<58} {r_total / 60:>20.1f} min")


if __name__ == "__main__":
    main()
