"""The ``nchains batch`` command: many regions, one Ray task each (:mod:`nchains.distributed`).

Regions are class pairs x seeds of the shipped model (``--pairs N``) or the entries of a YAML
spec (``--spec regions.yaml``); the extraction options are those of ``nchains extract``. Every
argument and the spec are checked, and ``--out`` checked writable, before Ray starts.
"""

from __future__ import annotations

import json
import math
import sys

from nchains.cli._inputs import csv_list
from nchains.cli._outputs import check_output_dir
from nchains.cli.extract import _config, add_config_args

#: Exit code of a batch that ran to the end with at least one failed region (2: bad input, 1: a bug).
EXIT_FAILED_REGIONS = 3


def add_command(sub) -> None:
    """Registers ``batch`` on an argparse sub-parsers object."""
    p = sub.add_parser("batch", help="extract chains for many regions in parallel on Ray",
                       description="Extract one chain per region (class pair x seed, or a YAML spec entry), one Ray "
                                   "task each, into DIR/results.jsonl and DIR/chains/. Rerunning with the same --out "
                                   "skips the regions already done. Needs Ray: pip install nchains[ray].")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--pairs", type=int, default=None,
                       help="number of class pairs of the shipped model (fixed shuffled order; up to 45)")
    which.add_argument("--spec", default=None, help="YAML file with 'regions:', a list of entries (classes, and "
                                                    "optionally name, images, model, weights, per_class, seeds...)")
    p.add_argument("--classes-from", dest="classes_from", default=None,
                   help="with --pairs: comma-separated classes to pair (default all ten)")
    p.add_argument("--seeds", type=int, default=1, help="with --pairs: seeds 0..K-1 per pair (default 1)")
    p.add_argument("--per-class", dest="per_class", type=int, default=10, help="with --pairs: images per class (10)")
    p.add_argument("--confident", type=float, default=0.95,
                   help="with --pairs: only images the model predicts with at least this probability (0.95)")
    p.add_argument("--out", required=True, help="batch folder: new, empty, or an earlier run to resume")
    p.add_argument("--export", action="store_true", help="also export every chain (ts, onnx, pt2) under DIR/exports/")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT; `ray start --head` prints it); "
                        "default: start a local Ray")
    p.add_argument("--num-cpus", dest="num_cpus", type=int, default=None, help="CPUs of the local Ray (default all)")
    p.add_argument("--threads", type=int, default=1, help="CPUs and torch threads per task (default 1)")
    p.add_argument("--max-retries", dest="max_retries", type=int, default=3,
                   help="reruns of a task whose worker process died (default 3)")
    add_config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_batch)


def _check(args) -> None:
    from nchains.distributed._ray import check_address, check_num_cpus

    if args.spec is not None:
        for flag, value, default in (("--classes-from", args.classes_from, None), ("--seeds", args.seeds, 1),
                                     ("--per-class", args.per_class, 10), ("--confident", args.confident, 0.95)):
            if value != default:
                raise ValueError(f"{flag} goes with --pairs; with --spec give it per entry in the YAML file")
    if not (math.isfinite(args.confident) and 0.0 < args.confident <= 1.0):
        raise ValueError(f"--confident must be a probability in (0, 1], got {args.confident}")
    for flag, value, low, high in (("--threads", args.threads, 1, 1000), ("--max-retries", args.max_retries, 0, 1000)):
        if not low <= value <= high:
            raise ValueError(f"{flag} must be between {low} and {high}, got {value}")
    check_num_cpus(args.num_cpus, "--num-cpus")
    check_address(args.address, "--address")
    if args.address is not None and args.num_cpus is not None:
        raise ValueError("--num-cpus applies to a local Ray; a cluster given by --address has its own CPUs")


def _regions(args):
    from nchains.distributed.regions import load_region_spec, pair_regions

    if args.spec is not None:
        return load_region_spec(args.spec)
    try:
        return pair_regions(args.pairs, args.seeds, csv_list(args.classes_from, "--classes-from"),
                            per_class=args.per_class, confident=args.confident)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        for name in ("pairs", "seeds", "per_class", "classes_from", "classes"):
            text = text.replace(f"{name} must", f"--{name.replace('_', '-')} must", 1)
        raise ValueError(text.replace("classes: ", "--classes-from: ", 1)) from None


def _lines(summary, out: str) -> str:
    m = summary["medians"]
    text = (f"{summary['regions']} regions: {summary['ok']} ok, {summary['failed']} failed "
            f"({summary['ran']} run now, {summary['skipped']} done before)")
    if summary["ok"]:
        text += (f"\nmedians: filters kept {m['filters_kept']:g}/{m['filters_total']:g} ({m['kept_fraction']:.1%}), "
                 f"layers kept {m['layers_kept']:g}/{m['layers_total']:g}, KL {m['kl']:.4f}, agreement "
                 f"{m['agreement']:.3f}, prob drop {m['prob_drop']:.4f}, {m['seconds']:.1f} s per region")
    for region, error in summary["failed_regions"].items():
        text += f"\nfailed: {region}: {error}"
    return text + f"\nwrote {out}/results.jsonl, {out}/summary.json" + "".join(f", {out}/{p}" for p in summary["plots"])


def cmd_batch(args) -> int:
    from nchains.distributed._ray import require_ray
    from nchains.distributed.batch import run_batch

    _check(args)
    args.seed = 0  # _config reads it; each region's seed replaces it
    cfg = _config(args)
    check_output_dir(args.out)
    regions = _regions(args)
    require_ray("nchains batch")
    summary = run_batch(regions, args.out, cfg, export=args.export, address=args.address, num_cpus=args.num_cpus,
                        max_retries=args.max_retries, threads=args.threads, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(summary, indent=1))
    elif not args.quiet:
        print(_lines(summary, args.out))
    return 0 if summary["failed"] == 0 else EXIT_FAILED_REGIONS

