"""ROAR-lite on Fashion-MNIST (paper 2, Fig. 6d): remove the top-k% pixels of every training and
test image by each attribution method, retrain a small CNN, report test accuracy vs k.

The attributions are computed on the shipped Fashion-MNIST ResNet (``zoo.default_model()``) for
each image's true label; the retrained network is :func:`nchains.metrics.roar.roar_cnn`. Prints
one row per method (accuracy per fraction, AUC by the trapezoid rule: lower is better), and
with ``--out`` writes the result as JSON and the plot as PNG. ``--mask-control`` adds the leakage
control of :mod:`nchains.metrics.roar`: the same retraining on the removal masks alone.

Methods (``--methods``, comma-separated):
  random        U(0, 1) maps (the baseline a method must beat)
  gradient      ∂Φ/∂x
  input-mct     x ⊙ ∂Φ/∂x (InputMCT)
  input-intgrad integrated gradients on the pixels, zero baseline, ``--steps`` steps
  path-mct      critical-path gradient, NeuronMCT path at ``--sparsity`` (one path per image: ~0.4 s each)
  path-intgrad  critical-path gradient, NeuronIntGrad path (~``--steps``/3 s per image: slow)

Usage::

    python tools/bench_roar.py --train-size 2000 --test-size 500 --epochs 3 \\
        --methods random,gradient,input-mct,path-mct [--repeats 1] [--out DIR]

Needs the Debian package ``dataset-fashion-mnist`` (or ``--root``). The per-image path methods
dominate the time: (train + test images) x their cost per image, then one retraining
(~10 s for 2000 images, 3 epochs, one core) per method and fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no OpenMP spin-waiting

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nchains import metrics  # noqa: E402
from nchains._util.io import write_atomic  # noqa: E402


def method_table(args):
    """name -> method callable, for the names ``--methods`` accepts."""
    return {"random": lambda: metrics.random_attribution(args.seed),
            "gradient": lambda: metrics.gradient,
            "input-mct": lambda: metrics.gradient_x_input,
            "input-intgrad": lambda: metrics.input_intgrad_attribution(steps=args.steps),
            "path-mct": lambda: metrics.path_attribution("mct", sparsity=args.sparsity),
            "path-intgrad": lambda: metrics.path_attribution("intgrad", sparsity=args.sparsity, steps=args.steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="random,gradient,input-mct,path-mct")
    p.add_argument("--fractions", default="0,0.3,0.5,0.7,0.9", help="comma-separated, increasing, in [0, 1]")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fill", default="zero", choices=metrics.FILLS)
    p.add_argument("--sparsity", type=float, default=0.9, help="of the path methods")
    p.add_argument("--steps", type=int, default=16, help="integrated-gradient steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=None, help="Fashion-MNIST idx directory")
    p.add_argument("--out", type=Path, default=None, help="folder for roar.json and roar.png")
    p.add_argument("--mask-control", action="store_true",
                   help="also retrain on the removal masks alone (does the mask's shape leak the label?)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    table = method_table(args)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        p.error(f"--methods: unknown {unknown[0] if unknown else '(none)'}; accepted: {', '.join(table)}")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        p.error(f"--fractions must be comma-separated numbers, got {args.fractions!r}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            p.error(f"--out {str(args.out)!r} is not writable")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        result = metrics.roar({n: table[n]() for n in names}, fractions=fractions, train_size=args.train_size,
                              test_size=args.test_size, epochs=args.epochs, seed=args.seed, repeats=args.repeats,
                              fill=args.fill, root=args.root, mask_control=args.mask_control,
                              progress=not args.quiet)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    seconds = time.time() - t0
    result["seconds"] = round(seconds, 1)
    print(f"\nROAR on Fashion-MNIST: {args.train_size} train / {args.test_size} test images, {args.epochs} epochs, "
          f"{args.repeats} repeat(s), fill {args.fill}, seed {args.seed}; {seconds:.0f} s")
    head = "method".ljust(14) + "".join(f"k={f:<7g}" for f in result["fractions"]) + "AUC"
    print(head)
    print("-" * len(head))
    for name, r in sorted(result["methods"].items(), key=lambda kv: kv[1]["auc"]):
        print(name.ljust(14) + "".join(f"{a:<9.4f}" for a in r["accuracy"]) + f"{r['auc']:.4f}")
    if args.mask_control:
        print("\nthe removal masks alone (leakage control; chance ~0.10)")
        print(head[:-3])
        print("-" * len(head))
        for name, r in sorted(result["methods"].items(), key=lambda kv: kv[1]["auc"]):
            print(name.ljust(14) + "".join("-".ljust(9) if a is None else f"{a:<9.4f}" for a in r["mask_accuracy"]))
    if args.out is not None:
        write_atomic(args.out / "roar.json", json.dumps(result, indent=2) + "\n")
        metrics.plot_roar(result, path=args.out / "roar.png")
        print(f"wrote {args.out / 'roar.json'} and {args.out / 'roar.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
