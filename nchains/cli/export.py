"""The ``nchains export`` and ``nchains inspect`` sub-commands.

``nchains.cli`` calls :func:`add_commands`. Handlers raise ValueError/TypeError with one-line
messages naming the argument (the CLI prints them and exits with code 2); ``inspect`` returns
exit code 1 when an artifact is tampered, missing or unreadable.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Optional, Tuple

import torch

_DEFAULT_FORMATS = "ts,onnx,pt2"


def add_commands(subparsers) -> None:
    """Registers ``export`` and ``inspect`` on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "export", help="export a chain as a compact, verified model (TorchScript, ONNX, torch.export)",
        description="Build the chain's compact model (pruned filters removed, BN and scores folded), export it, "
                    "verify every artifact against the masked model and write chain.ts, chain.onnx, chain.pt2 and "
                    "manifest.json into --out. The chain knows its model; --model/--weights override it.")
    p.add_argument("chain", help="chain JSON written by `nchains extract`")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--formats", default=_DEFAULT_FORMATS,
                   help=f"comma-separated formats among ts (TorchScript), onnx, pt2 (default {_DEFAULT_FORMATS})")
    p.add_argument("--keep-scores", action="store_true",
                   help="keep BatchNorm and the scores as explicit per-channel ops (bit-exact filter weights)")
    p.add_argument("--model", default=None, help="'default' or torchvision:NAME (default: the chain's model)")
    p.add_argument("--weights", default=None, help="state_dict file for --model torchvision:NAME")
    p.add_argument("--num-classes", type=int, default=None, help="outputs of a torchvision model")
    p.add_argument("--images", default=None,
                   help="folder of images to verify on (default: the chain's own images, rebuilt from how "
                        "`nchains extract` chose them and checked against their hash, plus random inputs)")
    p.add_argument("--size", type=int, default=224, help="image size for --images (default 224)")
    p.add_argument("--preprocessing", choices=["imagenet", "none"], default="imagenet",
                   help="preprocessing of --images (default imagenet)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_export)

    q = subparsers.add_parser(
        "inspect", help="describe and verify an exported artifact or manifest",
        description="Show the layers and filters kept, parameters, FLOPs and their ratio to the original, class "
                    "names and verification status of an export folder, its manifest.json, chain.ts/.onnx/.pt2 "
                    "or a chain JSON. Artifacts are re-hashed against the manifest: a tampered file is reported "
                    "and the exit code is 1.")
    q.add_argument("file", help="export folder, manifest.json, chain.ts, chain.onnx, chain.pt2 or chain JSON")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.set_defaults(func=cmd_inspect)


def _chain_images(chain, spec) -> Tuple[Optional[torch.Tensor], str, Optional[str]]:
    """(images, what they are, warning or None) to verify the export of ``chain`` on.

    The chain's own images, rebuilt from ``chain.images_source`` by the function ``nchains
    extract`` picked them with, when their hash matches ``chain.images_hash``. Otherwise (a chain
    without a source, or data that changed since: then the warning says so) for the shipped model
    :func:`_default_chain_images`, and no images for other models."""
    from nchains.models.image_source import images_from_source
    from nchains._util.io import hash_tensor

    warning = None
    if chain.images_source is not None:
        try:
            images, what = images_from_source(chain.images_source)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            warning = f"the chain's images could not be rebuilt from its images_source: {exc}"
        else:
            got = hash_tensor(images)
            if got == chain.images_hash:
                return images, f"the chain's {what} (rebuilt from its images_source, hash verified)", None
            warning = (f"the chain's images could not be rebuilt: its images_source gives {what} whose hash "
                       f"{got[:12]}… differs from the chain's images_hash {chain.images_hash[:12]}… "
                       "(has the data changed?)")
    if spec.get("kind") == "default":
        images, what = _default_chain_images(chain)
    else:
        images, what = None, "no images (pass --images to verify on real ones)"
    return images, what, warning


def _default_chain_images(chain) -> Tuple[Optional[torch.Tensor], str]:
    """For chains that do not record their images_source (version-1 files) or whose source no
    longer gives their images: the chain's images found by trying common ``per_class`` values and
    class orders of the shipped sample (hash-checked), else sample images of the chain's classes."""
    from nchains.models import zoo
    from nchains._util.io import hash_tensor

    classes = list(chain.classes)
    orders = list(itertools.permutations(classes)) if len(classes) <= 3 else [tuple(classes)]
    for per_class in (10, 5, 20, 1, 2, 3, 4, 8, 15, 25, 50, 100):
        for order in orders:
            try:
                images, _, _ = zoo.default_images(list(order), per_class=per_class, seed=chain.seed)
            except ValueError:
                continue
            if hash_tensor(images) == chain.images_hash:
                return images, f"the chain's {len(images)} images"
    try:
        images, _, _ = zoo.default_images(classes or None, per_class=5, seed=0, confident=None)
    except ValueError:
        return None, "random inputs only"
    return images, f"{len(images)} shipped images of the chain's classes (the chain's own could not be rebuilt)"


def cmd_export(args) -> int:
    from nchains.neurochains.chain import Chain
    from nchains.export.exporter import _formats, export
    from nchains.models.spec import load_model, parse_model_spec

    try:
        formats = _formats(args.formats)
    except ValueError as exc:
        raise ValueError(f"--formats: {exc}") from None
    chain = Chain.load(args.chain)
    if args.model is not None or args.weights is not None:
        spec = parse_model_spec(args.model, args.weights, args.num_classes)
    elif chain.model_spec:
        spec = dict(chain.model_spec)
        if args.num_classes is not None:
            spec["num_classes"] = args.num_classes
    else:
        raise ValueError(f"chain {args.chain!r} does not record its model; pass --model (and --weights)")
    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}")
    model = load_model(spec)
    try:
        chain.check_model(model)
    except ValueError as exc:
        raise ValueError(f"--model/--weights: {exc}") from None
    preprocessing, warning = None, None
    if args.images is not None:
        from nchains.models.images import load_image_folder

        images, _, _, _ = load_image_folder(args.images, size=args.size, preprocessing=args.preprocessing,
                                            grayscale=spec.get("kind") == "default")
        what = f"{len(images)} images from {args.images}"
        if spec.get("kind") != "default":
            preprocessing = {"kind": args.preprocessing, "size": args.size}
    else:
        images, what, warning = _chain_images(chain, spec)
        source = chain.images_source or {}
        if source.get("kind") == "folder" and spec.get("kind") != "default":
            preprocessing = {"kind": source.get("preprocessing"), "size": source.get("size")}
    if images is not None and list(images.shape[1:]) != list(chain.input_shape):
        raise ValueError(f"--images gives inputs of shape {list(images.shape[1:])} but the chain's input shape "
                         f"is {chain.input_shape} (check --size)")
    quiet = args.quiet or args.json
    if warning is not None and not args.quiet:
        print(f"nchains: warning: {warning}", file=sys.stderr)
    if not quiet:
        print(f"exporting to {args.out}; verifying on {what} and random inputs", file=sys.stderr)
    note = what if warning is None else f"{warning}; verified on {what} instead"
    manifest = export(chain, model, args.out, formats=formats, images=images, keep_scores=args.keep_scores,
                      preprocessing=preprocessing, progress=not quiet, images_note=note)
    if args.json:
        print(json.dumps(manifest, indent=1))
    elif not args.quiet:
        c = manifest["compact"]
        print(f"compact model: {c['params']:,} parameters ({c['params_ratio']:.1%} of the original), "
              f"{c['flops']:,} FLOPs ({c['flops_ratio']:.1%}), {c['convs_run']}/{c['convs_total']} convs run")
        for fmt, info in manifest["artifacts"].items():
            v = manifest["verification"]["formats"][fmt]
            print(f"wrote {os.path.join(args.out, info['file'])}  {info['bytes']:,} bytes  "
                  f"max |diff| {v['max_abs_diff']:.2g} (relative {v['relative']:.2g}), "
                  f"argmax {v['argmax_agree']}/{v['rows']}  sha256 {info['sha256'][:16]}…")
        print(f"wrote {os.path.join(args.out, 'manifest.json')}")
    return 0


def cmd_inspect(args) -> int:
    from nchains.export.artifacts import format_report, inspect_artifact

    report = inspect_artifact(args.file)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1
