"""The ``nchains report`` command: a chain's self-contained visual report (``DIR/index.html``).

Like ``nchains export`` it rebuilds the chain's model (``--model``/``--weights`` override it)
and its images (from the chain's record, hash-checked; ``--images DIR`` overrides them).
Every option is checked, and ``--out`` checked replaceable and writable, before any work.
"""

from __future__ import annotations

import os
import sys
import time

from nchains.cli._inputs import add_chain_model_args


def add_command(subparsers) -> None:
    """Registers ``report`` on an argparse sub-parsers object."""
    from nchains.report.build import DEFAULT_ANALYSES
    from nchains.report.actmax import DEFAULT_STEPS

    p = subparsers.add_parser(
        "report", help="write a chain's visual report: one self-contained HTML page",
        description="Write DIR/index.html: the chain graph (SVG), the chain's images with the original and chain "
                    "predictions, SMOE maps per layer of one image per class, activation maximisation and "
                    "top-activating images of every kept filter, the inference chain per class, the metrics and the "
                    "analyses' plots (numbers in DIR/analyses.json; DIR/report.json lists the files). No network "
                    "resource: inline SVG and PNG only.")
    p.add_argument("chain", help="chain JSON written by `nchains extract` (or Chain.save)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty or an earlier report (replaced as a whole, atomically); a folder "
                        "holding other files is refused")
    add_chain_model_args(p, "folder of images to report on (default: the chain's own images, rebuilt and "
                            "hash-checked)")
    p.add_argument("--analyses", default=DEFAULT_ANALYSES,
                   help="comma-separated analyses among fidelity, faithfulness, quotient, stability, robustness, "
                        f"magnitude; 'all' or 'none' (default {DEFAULT_ANALYSES})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"activation-maximisation steps (default {DEFAULT_STEPS}; 0 shows the starting noise)")
    p.add_argument("--edges", type=int, default=3,
                   help="strongest incoming edges drawn per filter in the chain graph (default 3; 0: all)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_report)


def _check_args(args):
    from nchains.neurochains.analyses.run import parse_which

    if not 0 <= args.steps <= 10**5:
        raise ValueError(f"--steps must be between 0 and 100000, got {args.steps}")
    if not 0 <= args.edges <= 10**5:
        raise ValueError(f"--edges must be between 0 (all) and 100000, got {args.edges}")
    if args.size is not None and not 1 <= args.size <= 4096:
        raise ValueError(f"--size must be between 1 and 4096 pixels, got {args.size}")
    if args.images is None and (args.size is not None or args.preprocessing is not None):
        raise ValueError("--size/--preprocessing apply to --images DIR")
    if args.images is not None and not os.path.isdir(args.images):
        raise ValueError(f"--images {args.images!r} is not a folder")
    if args.analyses.strip() != "none":
        try:
            parse_which(args.analyses)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--analyses: {exc}".replace("which must", "it must")) from None


def cmd_report(args) -> int:
    from nchains._util.publish import check_writable
    from nchains.cli._outputs import check_output_dir
    from nchains.cli.analyze import _inputs
    from nchains.report.build import replace_problem, report

    _check_args(args)
    check_output_dir(args.out)
    check_writable(args.out, replace_problem, "--out", kind="report")
    warn = (lambda text: None) if args.quiet else (lambda text: print(f"nchains: warning: {text}", file=sys.stderr))
    chain, _, model, images = _inputs(args, warn)  # as `nchains export` and `nchains analyze` find them
    log = None if args.quiet else (lambda text: print(f"report: {text}", file=sys.stderr))
    if log:
        log(f"{len(images)} images, {chain.metrics.get('filters_kept')} kept filters")
    t0 = time.perf_counter()
    path = report(chain, model, args.out, images=images, analyses=args.analyses, actmax_steps=args.steps,
                  edges_per_filter=args.edges or None, progress=None if not args.quiet else False, log=log)
    if not args.quiet:
        print(f"wrote {path}  {os.path.getsize(path):,} bytes  in {time.perf_counter() - t0:.0f} s")
    return 0
