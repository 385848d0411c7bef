"""The ``nchains export`` command: a chain's compact model, verified, in every runtime's format.

Handlers raise ValueError/TypeError with one-line messages naming the argument (the CLI prints
them and exits with code 2). ``--out`` is checked writable before the model is loaded.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Optional, Tuple

import torch

from nchains.cli._inputs import add_chain_model_args
from nchains.cli._outputs import check_output_dir

_DEFAULT_FORMATS = "ts,onnx,pt2"


def add_command(subparsers) -> None:
    """Registers ``export`` on an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "export", help="export a chain as a compact, verified model (TorchScript, ONNX, torch.export, AOTInductor)",
        description="Build the chain's compact model (pruned filters removed, BN and scores folded), export it, "
                    "verify every artifact against the masked model and write chain.ts, chain.onnx, chain.pt2 (and "
                    "chain.aoti.pt2 with --formats ...,aoti) and manifest.json into --out. The chain knows its "
                    "model; --model/--weights override it.")
    p.add_argument("chain", help="chain JSON written by `nchains extract` (or Chain.save)")
    p.add_argument("--out", required=True,
                   help="output folder: new (created), empty, or an earlier export, which is replaced as a whole in "
                        "one atomic step; a folder holding other files is refused")
    p.add_argument("--formats", default=_DEFAULT_FORMATS,
                   help="comma-separated formats among ts (TorchScript), onnx, pt2 (torch.export), aoti (AOTInductor "
                        "package chain.aoti.pt2: compiled with the C++ compiler, a minute or more; e.g. "
                        f"--formats ts,onnx,pt2,aoti) (default {_DEFAULT_FORMATS})")
    p.add_argument("--keep-scores", action="store_true",
                   help="keep BatchNorm and the scores as explicit per-channel ops (bit-exact filter weights)")
    add_chain_model_args(p, "folder of images to verify on (default: the chain's own images, rebuilt from how "
                            "`nchains extract` chose them and checked against their hash, plus random inputs)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_export)


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


def _spec(args, chain) -> dict:
    from nchains.models.spec import parse_model_spec

    if args.model is not None or args.weights is not None:
        return parse_model_spec(args.model, args.weights, args.num_classes)
    if not chain.model_spec:
        raise ValueError(f"chain {args.chain!r} does not record its model; pass --model (and --weights)")
    spec = dict(chain.model_spec)
    if args.num_classes is not None:
        spec["num_classes"] = args.num_classes
    return spec


def chain_and_model(args) -> Tuple[object, dict, torch.nn.Module]:
    """The chain of ``args.chain``, the model spec (``--model`` or the chain's) and that model,
    checked to be the model the chain was extracted from."""
    from nchains.models.spec import load_model
    from nchains.neurochains.chain import Chain

    chain = Chain.load(args.chain)
    spec = _spec(args, chain)
    model = load_model(spec)
    try:
        chain.check_model(model)
    except ValueError as exc:
        raise ValueError(f"--model/--weights: {exc}") from None
    return chain, spec, model


def _folder_images(args, chain, spec, model) -> torch.Tensor:
    """``--images DIR`` preprocessed like the chain's own images (their record, else the model's
    default), ``--size``/``--preprocessing`` overriding."""
    from nchains.cli._inputs import in_channels
    from nchains.models.images import load_image_folder
    from nchains.models.spec import spec_preprocessing

    pre = spec_preprocessing(spec, in_channels(model))
    source = chain.images_source or {}
    if source.get("kind") == "folder":
        pre = {k: source.get(k, pre[k]) for k in pre}
    images, _, _, _ = load_image_folder(args.images, size=args.size or pre["size"],
                                        preprocessing=args.preprocessing or pre["preprocessing"],
                                        grayscale=bool(pre["grayscale"]))
    return images


def cmd_export(args) -> int:
    from nchains.export.exporter import _formats, export
    from nchains.export.folder import check_export_destination

    try:
        formats = _formats(args.formats)
    except ValueError as exc:
        raise ValueError(f"--formats: {exc}") from None
    if args.size is not None and not 1 <= args.size <= 4096:
        raise ValueError(f"--size must be between 1 and 4096 pixels, got {args.size}")
    if args.images is None and (args.size is not None or args.preprocessing is not None):
        raise ValueError("--size/--preprocessing apply to --images DIR")
    check_output_dir(args.out)
    check_export_destination(args.out, "--out")  # a file, a foreign folder or an unwritable parent: before the work
    chain, spec, model = chain_and_model(args)
    warning = None
    if args.images is not None:
        images = _folder_images(args, chain, spec, model)
        what = f"{len(images)} images from {args.images}"
    else:
        images, what, warning = _chain_images(chain, spec)
    if images is not None and list(images.shape[1:]) != list(chain.input_shape):
        raise ValueError(f"--images gives inputs of shape {list(images.shape[1:])} but the chain's input shape "
                         f"is {chain.input_shape} (check --size)")
    quiet = args.quiet or args.json
    if warning is not None and not args.quiet:
        print(f"nchains: warning: {warning}", file=sys.stderr)
    if not quiet:
        print(f"exporting to {args.out}; verifying on {what} and random inputs", file=sys.stderr)
    note = what if warning is None else f"{warning}; verified on {what} instead"
    # the manifest's input.preprocessing is what the chain's images went through (the exporter
    # derives it from the chain), whatever --images the export is verified on
    manifest = export(chain, model, args.out, formats=formats, images=images, keep_scores=args.keep_scores,
                      progress=not quiet, images_note=note)
    if args.json:
        print(json.dumps(manifest, indent=1))
    elif not args.quiet:
        c = manifest["compact"]
        print(f"compact model: {c['params']:,} parameters ({c['params_ratio']:.1%} of the original), "
              f"{c['macs']:,} MACs ({c['macs_ratio']:.1%}), {c['convs_run']}/{c['convs_total']} convs run")
        for fmt, info in manifest["artifacts"].items():
            v = manifest["verification"]["formats"][fmt]
            print(f"wrote {os.path.join(args.out, info['file'])}  {info['bytes']:,} bytes  "
                  f"max |diff| {v['max_abs_diff']:.2g} (relative {v['relative']:.2g}), "
                  f"argmax {v['argmax_agree']}/{v['rows']}  sha256 {info['sha256'][:16]}…")
        print(f"wrote {os.path.join(args.out, 'manifest.json')}")
    return 0
