"""The ``nchains extract`` command: a chain from a model and a set of images.

Every argument is checked, and ``--out`` is checked writable, before the model is loaded; the
images are preprocessed the way the model expects (:func:`nchains.models.spec.spec_preprocessing`,
``--size``/``--preprocessing`` override it) and named by the model or by the class sub-folders.
Doubts that do not stop the run (fewer images than ``--per-class``, a model that disagrees with
the folder labels) are ``nchains: warning:`` lines on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict

from nchains.cli._inputs import add_input_args, check_input_args, load_inputs
from nchains.cli._outputs import check_output_file


def add_command(sub) -> None:
    """Registers ``extract`` on an argparse sub-parsers object."""
    p = sub.add_parser("extract", help="extract a chain (NeuroChains) from a model and a set of images",
                       description="Extract the local inference chain of a CNN on images from one local region. "
                                   "Without --model it runs on the shipped Fashion-MNIST ResNet and its images.")
    add_input_args(p, seed_help="seed of the image choice and the extraction (default 0)")
    add_config_args(p)
    p.add_argument("--out", default="chain.json", help="where to write the chain (default chain.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table and no warnings")
    p.add_argument("--json", action="store_true", help="print the metrics, kept filters and strongest filters as JSON")
    p.set_defaults(func=cmd_extract)


def add_config_args(p) -> None:
    """Adds the extraction options (``NeuroChainsConfig`` fields, read by :func:`_config`) to ``p``;
    ``nchains batch`` takes the same ones."""
    p.add_argument("--lam", type=float, default=None, help="L1 weight on scores (default: paper's per family)")
    p.add_argument("--lam-gate", dest="lam_gate", type=float, default=None, help="gate penalty weight")
    p.add_argument("--steps", type=int, default=None, help="scoring steps (default 300)")
    p.add_argument("--lr", type=float, default=None, help="scoring learning rate (default 0.005)")
    p.add_argument("--tau", type=float, default=None, help="score threshold (default 0.1)")
    p.add_argument("--finetune-steps", dest="finetune_steps", type=int, default=None, help="default 50")
    p.add_argument("--finetune-lr", dest="finetune_lr", type=float, default=None, help="default 0.01")
    p.add_argument("--finetune-kl", dest="finetune_kl", type=float, default=None,
                   help="fine-tune when the KL exceeds this (default 0.1)")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning phase")
    p.add_argument("--no-early-stop", action="store_true", help="run every step (no stop on loss change < 0.02)")


def _config(args):
    from nchains.neurochains.config import NeuroChainsConfig

    overrides = {k: getattr(args, k) for k in ("lam", "lam_gate", "steps", "lr", "tau", "finetune_steps",
                                               "finetune_lr", "finetune_kl") if getattr(args, k) is not None}
    if args.no_early_stop:
        overrides["stop_delta"] = None
    if args.no_finetune:
        overrides["finetune"] = False
    return NeuroChainsConfig(seed=args.seed).replace(**overrides)


def _strongest(chain) -> Dict[str, Any]:
    """The chain's strongest filter per layer and class (``paths`` in chain files before version 3)."""
    found = getattr(chain, "strongest_filters", None)
    return found if found is not None else getattr(chain, "paths", {})


def cmd_extract(args) -> int:
    from nchains.neurochains.extraction import extract

    check_input_args(args)
    cfg = _config(args)
    if args.out:
        check_output_file(args.out)
    chatty = not (args.quiet or args.json)

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    inputs = load_inputs(args, warn)
    if chatty:
        print(f"extracting the inference chain of {inputs.spec.get('name', 'the default model')} on {inputs.what}",
              file=sys.stderr)
    chain = extract(inputs.model, inputs.images, cfg, class_names=inputs.class_names, progress=chatty,
                    model_spec=inputs.spec)
    chain.images_source = inputs.source  # how the images were chosen, so that `nchains export` can rebuild them
    if args.out:
        chain.save(args.out)
    if args.json:
        strongest = _strongest(chain)
        print(json.dumps({"out": args.out, "metrics": chain.metrics, "kept": chain.kept, "gates": chain.gates,
                          "strongest_filters": strongest, "paths": strongest}, indent=1))
    elif not args.quiet:
        print(chain.summary())
        print()
        print(chain.describe())
        if args.out:
            print(f"\nwrote {args.out}")
    return 0
