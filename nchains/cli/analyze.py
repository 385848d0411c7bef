"""The ``nchains analyze`` command: the NeuroChains paper's analyses of a chain
(:mod:`nchains.neurochains.analyses`), printed as JSON (``--json``) or written as
``results.json`` plus a PNG per analysis into ``--out`` (all or nothing; ``results.json``'s
``files`` lists the PNGs, and an existing ``--out`` is replaced only when it is empty or an
earlier analyze output holding only those files).

The model and the chain's images are found as ``nchains export`` finds them: the chain's model
(``--model``/``--weights`` override it) and its own images rebuilt from its ``images_source``
(``--images DIR`` overrides them). Every option is checked, and ``--out`` checked writable,
before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from nchains._util.publish import earlier_output_problem
from nchains.cli._inputs import add_chain_model_args
from nchains.cli._outputs import check_output_dir

_FILES = "results.json"


def add_command(subparsers) -> None:
    """Registers ``analyze`` on an argparse sub-parsers object."""
    from nchains.neurochains.analyses.robustness import DEFAULT_EPS, DEFAULT_STEPS
    from nchains.neurochains.analyses.run import ANALYSES, DEFAULT_ANALYSES

    p = subparsers.add_parser(
        "analyze", help="the NeuroChains analyses of a chain: faithfulness, quotient metric, stability, robustness, "
                        "magnitude baseline, fidelity vs size",
        description="Run the NeuroChains paper's analyses of a chain on its own images and print the numbers "
                    "(--json) or write results.json and one PNG per analysis into --out. The chain knows its model "
                    "and images; --model/--weights/--images override them.")
    p.add_argument("chain", help="chain JSON written by `nchains extract` (or Chain.save)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    out.add_argument("--out", default=None,
                     help="output folder for results.json and <analysis>.png: new, empty or an earlier analyze "
                          "output (replaced as a whole in one atomic step); a folder holding other files is refused")
    p.add_argument("--which", default="all",
                   help=f"comma-separated analyses among {','.join(ANALYSES)}, or all (default: "
                        f"{','.join(DEFAULT_ANALYSES)}, plus fidelity when --sweep is given)")
    p.add_argument("--sweep", default=None, metavar="LAMS",
                   help="fidelity vs size: comma-separated lam values, one extraction each (about 75 s per value "
                        "for the shipped model at 300 steps; see --sweep-steps)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="scoring steps of each sweep extraction (default: the chain's)")
    p.add_argument("--sweep-finetune-steps", type=int, default=None,
                   help="fine-tuning steps of each sweep extraction (default: the chain's)")
    p.add_argument("--pool", default=None,
                   help="stability's held-out images: sample (the shipped Fashion-MNIST test sample; the default "
                        "for the shipped model), test (the Fashion-MNIST test split, where installed) or a folder "
                        "of images preprocessed like the chain's; the chain's images are left out")
    p.add_argument("--ks", default=None,
                   help="stability: comma-separated neighbours per chain image (default 20,40,...,260)")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS,
                   help=f"robustness: L-infinity radius of FGSM and PGD in input units, after preprocessing "
                        f"(default {DEFAULT_EPS})")
    p.add_argument("--pgd-steps", type=int, default=DEFAULT_STEPS,
                   help=f"robustness: PGD steps of eps/4 from a random start (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="robustness: seed of PGD's random start (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per batched forward (default 256)")
    add_chain_model_args(p, "folder of images to analyse on (default: the chain's own images, rebuilt from how "
                            "`nchains extract` chose them)", pre_for="--images/--pool DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary (errors only)")
    p.set_defaults(func=cmd_analyze)


def _numbers(text: Optional[str], arg: str, kind) -> Optional[List]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{arg} must be a comma-separated list of numbers, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{arg} must be a comma-separated list of {what}, got {text!r}") from None


def _check_args(args) -> dict:
    """Every option checked before any work; returns the parsed lists."""
    from nchains.neurochains.analyses._common import check_int, check_number_list, check_real
    from nchains.neurochains.analyses.run import parse_which

    sweep = _numbers(args.sweep, "--sweep", float)
    parsed = {"which": parse_which(args.which, sweep_given=sweep is not None), "sweep": sweep,
              "ks": _numbers(args.ks, "--ks", int)}
    try:
        if sweep is not None:
            check_number_list("lams", sweep, bound="ge0")
        if parsed["ks"] is not None:
            check_number_list("ks", parsed["ks"], integer=True, low=1, high=10**7)
        check_real("eps", args.eps)
        check_int("pgd_steps", args.pgd_steps, 1, 10**4)
        check_int("seed", args.seed, 0, 2**63 - 1)
        check_int("batch_size", args.batch_size, 1, 1 << 20)
        for name in ("sweep_steps", "sweep_finetune_steps"):
            if getattr(args, name) is not None:
                check_int(name, getattr(args, name), 0, 10**6)
    except (TypeError, ValueError) as exc:  # name the flag, not the Python argument
        text = str(exc)
        for py, flag in (("lams", "--sweep"), ("ks", "--ks"), ("eps", "--eps"), ("pgd_steps", "--pgd-steps"),
                         ("seed", "--seed"), ("batch_size", "--batch-size"), ("sweep_steps", "--sweep-steps"),
                         ("sweep_finetune_steps", "--sweep-finetune-steps")):
            if text.startswith(py):
                text = flag + text[len(py):]
                break
        raise ValueError(text) from None
    if args.size is not None and not 1 <= args.size <= 4096:
        raise ValueError(f"--size must be between 1 and 4096 pixels, got {args.size}")
    if args.images is None and args.pool in (None, "sample", "test") and (args.size or args.preprocessing):
        raise ValueError("--size/--preprocessing apply to --images DIR or --pool DIR")
    if args.pool not in (None, "sample", "test") and not os.path.isdir(args.pool):
        raise ValueError(f"--pool {args.pool!r} is not sample, test or a folder of images")
    return parsed


def _written(results: dict) -> Optional[List[str]]:
    """The PNGs beside an analyze ``results.json`` (None for a JSON of another kind): its
    ``files``, or for an output of an nchains that did not record them, one per analysis."""
    from nchains.neurochains.analyses.run import ANALYSES, FORMAT

    if results.get("format") != FORMAT:
        return None
    return results["files"] if "files" in results else [f"{n}.png" for n in ANALYSES if n in results]


def _replace_problem(folder: str) -> Optional[str]:
    """Why an existing ``--out`` may not be replaced (None: empty or an earlier analyze output
    holding only the files its results.json lists)."""
    return earlier_output_problem(folder, _FILES, _written, "analyze")


def _labels(chain, images: torch.Tensor) -> Optional[torch.Tensor]:
    """The ground truth of the shipped sample's images (None for folders and other sources)."""
    from nchains.models import zoo
    from nchains._util.io import hash_tensor

    s = chain.images_source or {}
    if s.get("kind") != "default":
        return None
    try:
        x, y, _ = zoo.default_images(s["classes"], per_class=s["per_class"], seed=s["seed"], confident=s["confident"])
    except (ValueError, TypeError, KeyError):
        return None
    return y if hash_tensor(x) == hash_tensor(images) else None


def _bounds(chain, spec, preprocessing: Optional[str] = None):
    """The valid input range of the images after their preprocessing (``preprocessing`` when
    given, else the chain's images'), per channel; None when unknown."""
    from nchains.models.images import _statistics

    s = chain.images_source or {}
    if preprocessing is not None:
        pre, gray = preprocessing, chain.input_shape[0] == 1
    elif s.get("kind") == "folder":
        pre, gray = s.get("preprocessing"), bool(s.get("grayscale"))
    elif s.get("kind") == "default" or spec.get("kind") == "default":
        pre, gray = "fashion-mnist", True
    else:
        return None
    if pre == "none":
        return (0.0, 1.0)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in _statistics(pre, gray))
    return ((0 - mean) / std, (1 - mean) / std)


def _pool(args, chain, spec, model):
    from nchains.cli.export import _folder_images

    if args.pool is None or args.pool in ("sample", "test"):
        return args.pool
    return _folder_images(argparse.Namespace(**{**vars(args), "images": args.pool}), chain, spec, model)


def _inputs(args, warn):
    """(chain, spec, model, images) as ``nchains export`` finds them."""
    from nchains.cli.export import _chain_images, _folder_images, chain_and_model

    chain, spec, model = chain_and_model(args)
    if args.images is not None:
        images = _folder_images(args, chain, spec, model)
    else:
        images, what, warning = _chain_images(chain, spec)
        if warning is not None:
            warn(warning)
        if images is None:
            raise ValueError(f"the chain's images cannot be rebuilt ({what}); pass --images DIR")
    if list(images.shape[1:]) != list(chain.input_shape):
        raise ValueError(f"--images gives inputs of shape {list(images.shape[1:])} but the chain's input shape "
                         f"is {chain.input_shape} (check --size)")
    return chain, spec, model, images


def cmd_analyze(args) -> int:
    from nchains._util.publish import StagedFolder, check_writable
    from nchains.neurochains.analyses.plots import png_bytes
    from nchains.neurochains.analyses.run import figures, run_analyses
    from nchains.neurochains.analyses.summary import summary_lines

    parsed = _check_args(args)
    if args.out is not None:
        check_output_dir(args.out)
        check_writable(args.out, _replace_problem, "--out", kind="analyze output")

    def warn(text):
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    chain, spec, model, images = _inputs(args, warn)
    extra = {} if parsed["ks"] is None else {"ks": parsed["ks"]}
    results = run_analyses(chain, model, images, which=args.which, progress=not args.quiet,
                           labels=_labels(chain, images), pool=_pool(args, chain, spec, model),
                           sweep=parsed["sweep"], sweep_steps=args.sweep_steps,
                           sweep_finetune_steps=args.sweep_finetune_steps, eps=args.eps, pgd_steps=args.pgd_steps,
                           bounds=_bounds(chain, spec, args.preprocessing if args.images else None), seed=args.seed, batch_size=args.batch_size, **extra)
    if args.json:
        print(json.dumps(results, indent=1, allow_nan=False))
        return 0
    pngs = {f"{name}.png": png_bytes(fig) for name, fig in figures(results).items()}
    with StagedFolder(args.out, _replace_problem, "--out", kind="analyze output") as staged:
        index = {**results, "files": list(pngs)}
        staged.write(_FILES, (json.dumps(index, indent=1, allow_nan=False) + "\n").encode())
        for name, data in pngs.items():
            staged.write(name, data)
        staged.publish()
    names = [_FILES, *pngs]
    if not args.quiet:
        print("\n".join(summary_lines(results)))
        print(f"wrote {', '.join(os.path.join(args.out, n) for n in names)}")
    return 0
