"""The ``nchains extract`` command: a chain from a model and a set of images.

Every argument is checked, and ``--out`` is checked writable, before the model is loaded; the
images are preprocessed the way the model expects (:func:`nchains.models.spec.spec_preprocessing`,
``--size``/``--preprocessing`` override it) and named by the model or by the class sub-folders.
Doubts that do not stop the run (fewer images than ``--per-class``, a model that disagrees with
the folder labels) are ``nchains: warning:`` lines on stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from nchains.cli._outputs import check_output_file

_MAX_SIZE = 4096  # a larger --size is a typo; 4096x4096x3 float32 is already 200 MB per image
_DEFAULT_PER_CLASS = 10
_DEFAULT_CONFIDENT = 0.95
_LOW_AGREEMENT = 0.5


def add_command(sub) -> None:
    """Registers ``extract`` on an argparse sub-parsers object."""
    p = sub.add_parser("extract", help="extract a chain (NeuroChains) from a model and a set of images",
                       description="Extract the local inference chain of a CNN on images from one local region. "
                                   "Without --model it runs on the shipped Fashion-MNIST ResNet and its images.")
    p.add_argument("--model", default=None,
                   help="'default' (shipped Fashion-MNIST ResNet), torchvision:NAME (e.g. torchvision:resnet50), "
                        "or a TorchScript (.pt/.ts) / torch.export (.pt2) FILE")
    p.add_argument("--weights", default=None, help="state_dict file (.pt/.pth/.safetensors) for --model torchvision:NAME")
    p.add_argument("--num-classes", type=int, default=None, help="outputs of a torchvision model (default: from weights)")
    p.add_argument("--images", default=None,
                   help="folder of images, or of class sub-folders (required with a torchvision model); class "
                        "names come from the model, or from the sub-folders when the model has none")
    p.add_argument("--classes", default=None,
                   help="comma-separated classes, e.g. sneaker,ankle-boot (default model) or sub-folder names")
    p.add_argument("--per-class", type=int, default=None,
                   help=f"images per class (default {_DEFAULT_PER_CLASS}; a folder with fewer gives what it has, "
                        "with a warning)")
    p.add_argument("--confident", type=float, default=None,
                   help="shipped images only: pick images the model predicts with at least this probability "
                        f"(default {_DEFAULT_CONFIDENT})")
    p.add_argument("--size", type=int, default=None,
                   help="image size for --images (default: the model's, 28 for the default model, 224 otherwise)")
    p.add_argument("--preprocessing", choices=["imagenet", "fashion-mnist", "none"], default=None,
                   help="preprocessing of --images (default: the model's; fashion-mnist for the default model: "
                        "grayscale, Fashion-MNIST mean/std; imagenet otherwise: resize 256, centre crop, normalise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice and the extraction (default 0)")
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
    p.add_argument("--out", default="chain.json", help="where to write the chain (default chain.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table and no warnings")
    p.add_argument("--json", action="store_true", help="print the metrics, kept filters and strongest filters as JSON")
    p.set_defaults(func=cmd_extract)


def csv_list(text: Optional[str], arg: str = "--classes") -> Optional[List[str]]:
    """``"a, b"`` -> ``["a", "b"]``; ValueError for a list without names or with repeats."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{arg} must be a comma-separated list of class names, got {text!r}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise ValueError(f"{arg} must not repeat a class, got {', '.join(repeated)} more than once in {text!r}")
    return items


def _check_args(args) -> None:
    """ValueError for every out-of-range number or option that does not apply, before any work."""
    if args.per_class is not None and args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.size is not None and not 1 <= args.size <= _MAX_SIZE:
        raise ValueError(f"--size must be between 1 and {_MAX_SIZE} pixels, got {args.size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.confident is not None and not (math.isfinite(args.confident) and 0.0 < args.confident <= 1.0):
        raise ValueError(f"--confident must be a probability in (0, 1], got {args.confident}")
    if args.images is None:
        for flag, value in (("--size", args.size), ("--preprocessing", args.preprocessing)):
            if value is not None:
                raise ValueError(f"{flag} applies to --images DIR (the shipped images are Fashion-MNIST's 28x28)")
    else:
        if not os.path.isdir(args.images):
            what = "is not a folder" if os.path.exists(args.images) else "does not exist"
            raise ValueError(f"--images {args.images!r} {what}; expected a folder of images or of class sub-folders")
        if args.confident is not None:
            raise ValueError("--confident applies to the shipped images only, not to --images DIR")


def _in_channels(model) -> int:
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _default_images(args) -> Tuple[torch.Tensor, str, Dict[str, Any]]:
    from nchains.models.image_source import default_source, images_from_source

    per_class = _DEFAULT_PER_CLASS if args.per_class is None else args.per_class
    confident = _DEFAULT_CONFIDENT if args.confident is None else args.confident
    source = default_source(csv_list(args.classes), per_class, args.seed, confident)
    try:
        images, what = images_from_source(source)
    except ValueError as exc:  # name the CLI flags, not the Python arguments
        text = str(exc).replace("per_class", "--per-class").replace("classes:", "--classes:", 1)
        raise ValueError(text.replace("confident=None", "a lower --confident")) from None
    return images, what, source


def _folder_images(args, spec, model, warn) -> Tuple[torch.Tensor, Optional[List[str]], str, Dict[str, Any]]:
    """Images, output names, description and record of ``--images DIR``."""
    from nchains.models.class_names import label_agreement, name_classes
    from nchains.models.image_source import folder_selection, folder_source
    from nchains.models.spec import spec_class_names, spec_preprocessing

    pre = spec_preprocessing(spec, _in_channels(model))
    per_class = _DEFAULT_PER_CLASS if args.per_class is None else args.per_class
    source = folder_source(args.images, size=args.size or pre["size"],
                           preprocessing=args.preprocessing or pre["preprocessing"], grayscale=pre["grayscale"],
                           classes=csv_list(args.classes), per_class=per_class)
    sel = folder_selection(source)
    short = {c: n for c, n in sel.available.items() if n < per_class}
    if args.per_class is not None and short:
        warn(f"--per-class {per_class} but the folder has fewer images: "
             + ", ".join(f"{c} {n}" for c, n in short.items()) + f"; using all of them ({len(sel.images)} images)")
    elif args.per_class is not None and sel.labels is None:
        warn(f"--per-class applies to class sub-folders; {args.images!r} is a flat folder, using all its "
             f"{len(sel.images)} images")
    with torch.no_grad():
        logits = model(sel.images)
    naming = name_classes(sel.folder_classes, spec_class_names(spec, logits.shape[1]), logits.shape[1],
                          default_model=spec.get("kind") == "default")
    if naming.how == "model-unmatched":
        warn(f"the class sub-folders {sel.folder_classes} are not all class names of the model; the chain uses the "
             "model's names and the folder labels are not checked")
    elif naming.output_of is not None and sel.labels is not None:
        agree = label_agreement(logits, sel.labels, naming.output_of)
        if agree < _LOW_AGREEMENT:
            warn(f"the original model classifies only {agree:.0%} of the images as their folder's class; the chain "
                 f"describes the model on inputs it does not recognise (check --preprocessing/--size: applied "
                 f"{source['preprocessing']} at {source['size']}x{source['size']})")
    what = (f"{len(sel.images)} images from {source['path']} ({source['preprocessing']} preprocessing, "
            f"{source['size']}x{source['size']}{', grayscale' if source['grayscale'] else ''})")
    return sel.images, naming.class_names, what, source


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
    from nchains.models import zoo
    from nchains.models.spec import load_model, parse_model_spec
    from nchains.neurochains.extraction import extract

    _check_args(args)
    cfg = _config(args)
    if args.out:
        check_output_file(args.out)
    chatty = not (args.quiet or args.json)

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    spec = parse_model_spec(args.model, args.weights, args.num_classes)
    if spec["kind"] == "default" and args.images is None:
        model = load_model(spec)
        images, what, source = _default_images(args)
        class_names = zoo.default_class_names()
    elif args.images is None:
        raise ValueError("--images DIR is required with a --model other than the default")
    else:
        model = load_model(spec)
        images, class_names, what, source = _folder_images(args, spec, model, warn)
    if chatty:
        print(f"extracting the inference chain of {spec.get('name', 'the default model')} on {what}",
              file=sys.stderr)
    chain = extract(model, images, cfg, class_names=class_names, progress=chatty, model_spec=spec)
    chain.images_source = source  # how the images were chosen, so that `nchains export` can rebuild them
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
