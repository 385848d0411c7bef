"""The ``nchains`` command line.

Bad input is reported as one line ``nchains: error: ...`` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"nchains: error: {message}\n")


def _csv(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--classes must be a comma-separated list of class names, got {text!r}")
    return items


def _in_channels(model) -> int:
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _images_for(args, spec, model) -> tuple:
    """(images, class names of the model outputs or None, description of the data, images source):
    the source records how the images were chosen (``Chain.images_source``) and gives them."""
    from nchains.models.image_source import default_source, folder_source, images_from_source

    if spec["kind"] == "default" and args.images is None:
        from nchains.models import zoo

        source = default_source(_csv(args.classes), args.per_class, args.seed, args.confident)
        images, what = images_from_source(source)
        return images, zoo.default_class_names(), what, source
    if args.images is None:
        raise ValueError("--images DIR is required with a --model other than the default")
    source = folder_source(args.images, size=args.size, preprocessing=args.preprocessing,
                           grayscale=_in_channels(model) == 1, classes=_csv(args.classes), per_class=args.per_class)
    images, what = images_from_source(source)
    names = None
    if spec["kind"] == "torchvision" and not spec.get("num_classes"):
        try:
            import torchvision

            names = torchvision.models.get_model_weights(spec["name"]).DEFAULT.meta["categories"]
        except Exception:  # noqa: BLE001 - names are a nicety
            names = None
    return images, names, what, source


def _cmd_extract(args) -> int:
    from nchains.neurochains.chain import Chain  # noqa: F401
    from nchains.neurochains.config import NeuroChainsConfig
    from nchains.neurochains.extraction import extract
    from nchains.models.spec import load_model, parse_model_spec

    overrides = {k: getattr(args, k) for k in ("lam", "lam_gate", "steps", "lr", "tau", "finetune_steps",
                                               "finetune_lr", "finetune_kl") if getattr(args, k) is not None}
    if args.no_early_stop:
        overrides["stop_delta"] = None
    if args.no_finetune:
        overrides["finetune"] = False
    cfg = NeuroChainsConfig(seed=args.seed).replace(**overrides)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.out is not None and os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a directory; give a file name such as chain.json")
    spec = parse_model_spec(args.model, args.weights, args.num_classes)
    model = load_model(spec)
    images, class_names, what, source = _images_for(args, spec, model)
    if not args.quiet and not args.json:
        print(f"extracting the inference chain of {spec.get('name', 'the default model')} on {what}",
              file=sys.stderr)
    with torch.no_grad():
        n_out = model(images[:1]).shape[1]
    if class_names is not None and len(class_names) != n_out:
        class_names = None
    chain = extract(model, images, cfg, class_names=class_names, progress=not (args.quiet or args.json),
                    model_spec=spec)
    chain.images_source = source  # how the images were chosen, so that `nchains export` can rebuild them
    if args.out:
        chain.save(args.out)
    if args.json:
        print(json.dumps({"out": args.out, "metrics": chain.metrics, "kept": chain.kept, "gates": chain.gates,
                          "paths": chain.paths}, indent=1))
    elif not args.quiet:
        print(chain.summary())
        print()
        print(chain.describe())
        if args.out:
            print(f"\nwrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nchains", description="Extract, export and analyse local inference chains of CNNs.")
    parser.add_argument("--version", action="version", version=f"nchains {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("extract", help="extract a chain (NeuroChains) from a model and a set of images",
                       description="Extract the local inference chain of a CNN on images from one local region. "
                                   "Without --model it runs on the shipped Fashion-MNIST ResNet and its images.")
    p.add_argument("--model", default=None,
                   help="'default' (shipped Fashion-MNIST ResNet), torchvision:NAME (e.g. torchvision:resnet50), "
                        "or a TorchScript (.pt/.ts) / torch.export (.pt2) FILE")
    p.add_argument("--weights", default=None, help="state_dict file (.pt/.pth/.safetensors) for --model torchvision:NAME")
    p.add_argument("--num-classes", type=int, default=None, help="outputs of a torchvision model (default: from weights)")
    p.add_argument("--images", default=None,
                   help="folder of images, or of class sub-folders (required with a torchvision model)")
    p.add_argument("--classes", default=None,
                   help="comma-separated classes, e.g. sneaker,ankle-boot (default model) or sub-folder names")
    p.add_argument("--per-class", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--confident", type=float, default=0.95,
                   help="default model only: pick images the model predicts with at least this probability (0.95)")
    p.add_argument("--size", type=int, default=224, help="image size for --images (default 224)")
    p.add_argument("--preprocessing", choices=["imagenet", "none"], default="imagenet",
                   help="preprocessing of --images (default imagenet: resize 256, crop, normalise)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.add_argument("--json", action="store_true", help="print the metrics, kept filters and paths as JSON")
    p.set_defaults(func=_cmd_extract)

    try:
        from nchains.cli import export as _cli_export
    except ImportError:
        _cli_export = None
    if _cli_export is not None:
        _cli_export.add_commands(sub)
    return parser


def _version() -> str:
    from nchains import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"nchains: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("nchains: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
