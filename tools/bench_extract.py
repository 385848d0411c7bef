"""Benchmark :func:`nchains.extract` against a plain hook-based reproduction of NeuroChains.

Both sides get the same model, images and schedule (NeuroChainsConfig, resolved for the model
family, is passed field by field to ``tools/neurochains_baseline.py``). Two timings:

* alternating: one scoring iteration of each side in turn (b, n, n, b, ...), the nchains
  step being extract()'s loop body on a ScoredModel, the baseline step the hook model's;
  both compute the same loss, checked step by step. Robust against the machine's speed
  changing under us (other users, a shared host).
  Both sides run under glibc's default malloc settings here: this is the compute of a step.
* full runs: the real ``nchains.extract`` and ``neurochains_baseline`` calls (extract keeps
  freed memory during its loops, nchains._memory: no page faults per step), timed per
  iteration by a global ``torch.optim`` step post-hook (time between two consecutive Adam
  steps of the scoring phase, the first ``--warmup`` dropped) and in total; runs are
  interleaved (baseline, nchains, nchains, baseline, ...) and give filters kept, KL and
  agreement of the final chain.

The CPU time other processes take during each run is measured (/proc/stat); a disturbed run
is repeated (``--max-foreign``, ``--retries``) and the column ``other`` shows what was left.

Cases:
  shipped   the shipped Fashion-MNIST ResNet, 20 images (sneaker, ankle-boot, 10 each),
            the paper's full schedule (300 + 50 steps, early stop as configured);
  resnet50  torchvision ResNet-50, random weights (seed 0, BN running stats and affine
            randomised a bit), 20 random 224x224 images, a short schedule of ``--steps``
            scoring and fine-tune steps (a full run takes hours on 2 CPU cores).

Targets (printed, never asserted): nchains >= 1.5x faster per iteration; filters kept and KL
no worse than the baseline's by more than 5%.

Usage: python tools/bench_extract.py [--only shipped|resnet50] [--steps 8] [--rounds N]
                                    [--max-foreign 0.25] [--retries 2] [--malloc-keep] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.nn.functional as F  # noqa: E402

import nchains  # noqa: E402
from nchains import NeuroChainsConfig, ScoredModel, analyze
from nchains.models import zoo  # noqa: E402
from nchains.neurochains.extraction import _step, scoring_loss, scoring_optimizer  # noqa: E402
from neurochains_baseline import BaselineConfig, HookedNeuroChains, neurochains_baseline  # noqa: E402

SPEEDUP_TARGET = 1.5
QUALITY_SLACK = 0.05


def _faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to zero)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class ForeignLoad:
    """CPU time used by *other* processes during a block, in cores (from /proc/stat minus this
    process's own user+system time); None where /proc/stat is unavailable."""

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return float("nan")
        user, nice, system, idle, iowait, irq, softirq, steal = v
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        t = os.times()
        self._b0, self._own0, self._w0 = self._busy(), t.user + t.system, time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        t = os.times()
        wall = time.perf_counter() - self._w0
        self.cores = max(0.0, (self._busy() - self._b0) - (t.user + t.system - self._own0)) / max(wall, 1e-9)


class StepClock:
    """Timestamps of every optimizer step, grouped per optimizer (= per phase, in order)."""

    def __enter__(self):
        self.phases: List[tuple] = []  # (optimizer, [t...]); strong refs so ids are not reused
        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def _hook(self, opt, args, kwargs) -> None:
        if not self.phases or self.phases[-1][0] is not opt:
            self.phases.append((opt, []))
        self.phases[-1][1].append((time.perf_counter(), _faults()))

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def iteration_times(self, phase: int = 0) -> List[float]:
        if len(self.phases) <= phase:
            return []
        t = [ts for ts, _ in self.phases[phase][1]]
        return [b - a for a, b in zip(t, t[1:])]

    def iteration_faults(self, phase: int = 0) -> List[int]:
        if len(self.phases) <= phase:
            return []
        f = [n for _, n in self.phases[phase][1]]
        return [b - a for a, b in zip(f, f[1:])]


def run_nchains(model, images, cfg: NeuroChainsConfig) -> Dict:
    chain = nchains.extract(model, images, cfg)
    m = chain.metrics
    return {k: m[k] for k in ("filters_kept", "filters_total", "kl", "agreement", "steps_run",
                              "finetune_steps_run", "regions_kept", "regions_total")}


def baseline_config(cfg: NeuroChainsConfig) -> BaselineConfig:
    return BaselineConfig(**{k: getattr(cfg, k) for k in BaselineConfig.__dataclass_fields__})


def run_baseline(model, images, cfg: NeuroChainsConfig) -> Dict:
    res = neurochains_baseline(model, images, baseline_config(cfg))
    m = res.metrics
    return {k: m[k] for k in ("filters_kept", "filters_total", "kl", "agreement", "steps_run",
                              "finetune_steps_run", "regions_kept", "regions_total")}


SIDES: Dict[str, Callable] = {"baseline": run_baseline, "nchains": run_nchains}


def measure(model, images, cfg: NeuroChainsConfig, rounds: int, warmup: int, max_foreign: float,
            retries: int) -> Dict[str, Dict]:
    """Interleaved runs; per side: iteration times of the scoring phase (all rounds), totals
    per round and the metrics of the first round (checked equal across rounds).

    A run during which other processes used more than ``max_foreign`` cores is repeated (up to
    ``retries`` times) and the least disturbed attempt is kept."""
    out = {side: {"iters": [], "faults": [], "ft_iters": [], "totals": [], "foreign": [], "metrics": None,
                  "stable": True}
           for side in SIDES}
    for r in range(rounds):
        order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]
        for side in order:
            best = None
            for attempt in range(retries + 1):
                gc.collect()
                with ForeignLoad() as load, StepClock() as clock:
                    t0 = time.perf_counter()
                    metrics = SIDES[side](model, images, cfg)
                    total = time.perf_counter() - t0
                its = clock.iteration_times(0)[warmup:]
                print(f"  round {r + 1}/{rounds} {side:8s}: {total:7.2f} s, "
                      f"{1e3 * statistics.median(its or [float('nan')]):8.1f} ms/iter, "
                      f"other processes {load.cores:.2f} cores"
                      + ("" if load.cores <= max_foreign else " (disturbed)"), flush=True)
                if best is None or load.cores < best[0]:
                    best = (load.cores, its, clock.iteration_faults(0)[warmup:], clock.iteration_times(1), total,
                            metrics)
                if load.cores <= max_foreign:
                    break
            foreign, its, faults, ft_its, total, metrics = best
            rec = out[side]
            rec["iters"] += its
            rec["faults"] += faults
            rec["ft_iters"] += ft_its
            rec["totals"].append(total)
            rec["foreign"].append(foreign)
            if rec["metrics"] is None:
                rec["metrics"] = metrics
            elif metrics != rec["metrics"]:
                rec["stable"] = False
    return out


def alternating_steps(model, images, cfg: NeuroChainsConfig, steps: int, warmup: int) -> Dict:
    """Scoring-phase iterations of both sides alternated one by one (b, n, n, b, ...), so any
    change in machine speed hits both alike. The nchains step is extract()'s own loop body
    (ScoredModel, the same loss, Adam); the baseline step is the hook model's loss and Adam.
    Both sides compute the same function, so their losses must agree step by step: the
    largest relative difference is returned as a check."""
    with torch.no_grad():
        target_logp = F.log_softmax(model(images), dim=1)
    sm = ScoredModel(analyze(model, images[:1]), score_linear=cfg.score_linear, temperature=cfg.temperature)
    sm.train()
    n_opt = scoring_optimizer(sm, cfg.lr)

    def n_step() -> float:  # extract()'s own scoring iteration
        return float(_step(n_opt, lambda: scoring_loss(sm, images, target_logp, cfg.lam, cfg.lam_gate))[0])

    hk = HookedNeuroChains(model, images, baseline_config(cfg))  # after nchains' tracing
    b_opt = torch.optim.Adam(hk.score_list + hk.alpha_list, lr=cfg.lr)

    def b_step() -> float:
        b_opt.zero_grad(set_to_none=True)
        loss = hk.loss()
        loss.backward()
        b_opt.step()
        return float(loss.detach())

    fns = {"baseline": b_step, "nchains": n_step}
    times = {side: [] for side in fns}
    faults = {side: [] for side in fns}
    losses = {side: [] for side in fns}
    try:
        with ForeignLoad() as load:
            for i in range(warmup + steps):
                for side in (fns if i % 2 == 0 else list(fns)[::-1]):
                    f0, t0 = _faults(), time.perf_counter()
                    losses[side].append(fns[side]())
                    if i >= warmup:
                        times[side].append(time.perf_counter() - t0)
                        faults[side].append(_faults() - f0)
    finally:
        hk.restore()
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["baseline"], losses["nchains"]))
    print(f"  alternating steps: baseline {1e3 * _med(times['baseline']):.1f} ms/iter, nchains "
          f"{1e3 * _med(times['nchains']):.1f} ms/iter, other processes {load.cores:.2f} cores, "
          f"max relative loss difference {diff:.1e}", flush=True)
    return {"times": times, "faults": faults, "loss_diff": diff, "foreign": load.cores}


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def report(title: str, res: Dict[str, Dict], alt: Dict) -> List[str]:
    b, n = res["baseline"], res["nchains"]
    bi, ni = _med(b["iters"]), _med(n["iters"])
    ba, na = _med(alt["times"]["baseline"]), _med(alt["times"]["nchains"])
    bt, nt = min(b["totals"]), min(n["totals"])
    bm, nm = b["metrics"], n["metrics"]
    head = (f"{'side':10s} {'alt ms/it':>9s} {'(n)':>4s} {'flt/it':>7s} {'ms/iter':>9s} {'(n)':>5s} "
            f"{'flt/it':>7s} {'ft ms/it':>9s} {'total s':>8s} {'steps':>8s} {'filters kept':>13s} "
            f"{'regions':>8s} {'KL':>9s} {'agree':>6s} {'other':>6s}")
    lines = [f"== {title}", head, "-" * len(head)]
    for side, rec in (("baseline", b), ("nchains", n)):
        m = rec["metrics"]
        lines.append(
            f"{side:10s} {1e3 * _med(alt['times'][side]):9.1f} {len(alt['times'][side]):4d} "
            f"{_med(alt['faults'][side]):7.0f} {1e3 * _med(rec['iters']):9.1f} {len(rec['iters']):5d} "
            f"{_med(rec['faults']):7.0f} {1e3 * _med(rec['ft_iters']):9.1f} "
            f"{min(rec['totals']):8.2f} {m['steps_run']:>4d}+{m['finetune_steps_run']:<3d} "
            f"{m['filters_kept']:>6d}/{m['filters_total']:<6d} {m['regions_kept']:>3d}/{m['regions_total']:<4d} "
            f"{m['kl']:9.5f} {m['agreement']:6.2f} {max(rec['foreign']):6.2f}"
            + ("" if rec["stable"] else "  (metrics differ across rounds!)"))
    speed_it, speed_tot = bi / ni, bt / nt
    f_ratio = nm["filters_kept"] / max(bm["filters_kept"], 1)
    kl_ratio = nm["kl"] / bm["kl"] if bm["kl"] > 0 else float("inf") if nm["kl"] > 0 else 1.0
    speed_alt = ba / na
    speed_ft = _med(b["ft_iters"]) / _med(n["ft_iters"])
    lines.append(f"{'ratio':10s} {speed_alt:8.2f}x {'':4s} {'':7s} {speed_it:8.2f}x {'':5s} {'':7s} {speed_ft:8.2f}x "
                 f"{speed_tot:7.2f}x {'':8s} {f_ratio:13.3f} {'':8s} {kl_ratio:9.3f}   "
                 "(speed: baseline/nchains; filters, KL: nchains/baseline)")
    same = (bm["steps_run"], bm["finetune_steps_run"]) == (nm["steps_run"], nm["finetune_steps_run"])
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    lines += [
        f"targets: per-iteration speedup {speed_alt:.2f}x (alternating) / {speed_it:.2f}x (full runs) >= "
        f"{SPEEDUP_TARGET}x: {ok(min(speed_alt, speed_it) >= SPEEDUP_TARGET)}; "
        f"filters kept ratio {f_ratio:.3f} <= {1 + QUALITY_SLACK}: {ok(f_ratio <= 1 + QUALITY_SLACK)}; "
        f"KL ratio {kl_ratio:.3f} <= {1 + QUALITY_SLACK}: {ok(kl_ratio <= 1 + QUALITY_SLACK)}; "
        f"same schedule (steps run): {'yes' if same else 'NO'}; same loss step by step (alternating): "
        f"{'yes' if alt['loss_diff'] <= 1e-4 else 'NO'} (max rel. diff {alt['loss_diff']:.1e})",
    ]
    return lines


def shipped_case(quick: bool):
    model = zoo.default_model()
    per_class = 1 if quick else 10
    images, _, _ = zoo.default_images(["sneaker", "ankle-boot"], per_class=per_class)
    cfg = NeuroChainsConfig()
    if quick:
        cfg = cfg.replace(steps=3, finetune_steps=3)
    return model, images, cfg.resolved("resnet"), f"shipped Fashion-MNIST ResNet, {len(images)} images"


def resnet50_case(quick: bool, steps: int):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():  # so the random net is not a near-identity stack of blocks
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    model.eval()
    size, n = (64, 2) if quick else (224, 20)
    steps = 3 if quick else steps
    images = torch.randn(n, 3, size, size)
    cfg = NeuroChainsConfig(steps=steps, finetune_steps=steps).resolved("resnet")
    return model, images, cfg, f"torchvision ResNet-50 (random), {n} images {size}x{size}, {steps}+{steps} steps"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("shipped", "resnet50"), help="run one case")
    parser.add_argument("--steps", type=int, default=8,
                        help="ResNet-50 scoring and fine-tune steps (default 8)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per side (default 3 shipped, 2 resnet50, 1 quick)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="iterations of each run's scoring phase not timed (default 1)")
    parser.add_argument("--max-foreign", type=float, default=0.25,
                        help="repeat a run when other processes used more than this many cores (default 0.25)")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeats of a disturbed run; the least disturbed attempt is kept (default 2)")
    parser.add_argument("--malloc-keep", action="store_true",
                        help="re-run under glibc settings that keep freed memory in the process "
                             "(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ huge), so neither side pays page "
                             "faults that depend on the heap's history (see flt/it)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: tiny sizes (ResNet-50 at 64x64, 2 images, 3 steps); not a benchmark")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    if args.malloc_keep and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads these at start-up

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start"
          + (", glibc malloc keeps freed memory (--malloc-keep)" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else ""),
          flush=True)
    tables = []
    cases = [args.only] if args.only else ["shipped", "resnet50"]
    for case in cases:
        if case == "shipped":
            model, images, cfg, title = shipped_case(args.quick)
            rounds = args.rounds or (1 if args.quick else 3)
        else:
            model, images, cfg, title = resnet50_case(args.quick, args.steps)
            rounds = args.rounds or (1 if args.quick else 2)
        warmup = 0 if args.quick else args.warmup
        print(f"{title}: {rounds} interleaved round(s) per side", flush=True)
        alt_steps = 3 if args.quick else (30 if case == "shipped" else args.steps)
        alt = alternating_steps(model, images, cfg, alt_steps, 1 if args.quick else 2)
        res = measure(model, images, cfg, rounds, warmup, args.max_foreign, 0 if args.quick else args.retries)
        tables.append(report(title, res, alt))
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; alt ms/it = median scoring iteration with the "
          f"two sides alternating step by step (n per side); ms/iter = median scoring-phase iteration "
          f"of the full runs (n = timed iterations over all rounds); flt/it = median minor page faults per "
          f"iteration (fresh memory the kernel zeroes: glibc returns buffers > 32 MB to the OS); "
          f"ft = fine-tune phase; total = wall time of one "
          f"full call (best of rounds; nchains' includes fx analysis, model hashing and strongest "
          f"filters); other = CPU cores used by other processes during the worst kept run")
    for lines in tables:
        print()
        print("\n".join(lines))


if __name__ == "__main__":
    main()
