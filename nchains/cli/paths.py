"""The ``nchains paths`` command: sparse critical paths of one image and their attribution maps.

The image is ``--image FILE`` (preprocessed the way the model expects), ``--default-index K``
(the K-th image of the shipped Fashion-MNIST sample, normalised as the shipped model expects;
the default is 0), or the one image the shared image options select (``--images DIR`` or
``--classes`` with ``--per-class 1``). The contributions are computed once; per sparsity
``--out DIR`` gets ``path_<s>.npz`` (the masks, :meth:`CriticalPath.save`'s format),
``attribution_<s>.png`` (the input beside its path-gradient map) and one ``paths.json`` summary
(neurons kept per site with the papers' labels), all or nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from nchains._util.publish import earlier_output_problem
from nchains.cli._inputs import add_input_args, check_input_args, in_channels, load_inputs, parse_target

SUMMARY = "paths.json"
FORMAT = "nchains-paths"
MAX_SPARSITIES = 32


def add_command(sub) -> None:
    """Registers ``paths`` on an argparse sub-parsers object."""
    p = sub.add_parser("paths", help="sparse critical paths of one image and their attribution maps",
                       description="Select the critical neurons of one image's response network-wise (NeuronIntGrad "
                                   "or NeuronMCT), and write per sparsity the masks, a JSON summary and the "
                                   "path-gradient attribution beside the input. Without --model it runs on the "
                                   "shipped Fashion-MNIST ResNet and its shipped image 0.")
    add_input_args(p, per_class_default=1)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", default=None, help="one image FILE, preprocessed as the model expects")
    src.add_argument("--default-index", dest="default_index", type=int, default=None,
                     help="the K-th image (0-999) of the shipped Fashion-MNIST sample (default model only)")
    p.add_argument("--sparsity", default="0.9,0.99", help="comma-separated sparsities in [0, 1] (default 0.9,0.99)")
    p.add_argument("--method", choices=["intgrad", "mct"], default="intgrad",
                   help="neuron contributions: intgrad (NeuronIntGrad, signed) or mct (NeuronMCT) (default intgrad)")
    p.add_argument("--target", default="pred", help="'pred' (the predicted class, default) or a class index")
    p.add_argument("--steps", type=int, default=50, help="integrated-gradient steps (default 50)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier `nchains paths` output)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table and no warnings")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_paths)


def parse_sparsities(text: str) -> List[float]:
    """``"0.9, 0.99"`` -> ``[0.9, 0.99]``; ValueError naming --sparsity otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items or len(items) > MAX_SPARSITIES:
        raise ValueError(f"--sparsity must be 1 to {MAX_SPARSITIES} comma-separated numbers in [0, 1], got {text!r}")
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--sparsity must be numbers in [0, 1], got {item!r} in {text!r}") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"--sparsity must be numbers in [0, 1], got {item}")
        if value in out:
            raise ValueError(f"--sparsity must not repeat a value, got {item} twice")
        out.append(value)
    return out


def out_problem(folder: str) -> Optional[str]:
    """None when ``folder`` is empty or an earlier ``nchains paths`` output holding only its files."""
    return earlier_output_problem(folder, SUMMARY, lambda summary: (
        n for entry in summary["paths"] for n in (entry["file"], entry["png"])), "paths")


def _check_args(args) -> Tuple[List[float], Any]:
    """Every check that needs no model, in the order the user reads the options."""
    check_input_args(args)
    sparsities = parse_sparsities(args.sparsity)
    target = parse_target(args.target)
    if not 1 <= args.steps <= 100_000:
        raise ValueError(f"--steps must be an int in [1, 100000], got {args.steps}")
    if args.default_index is not None and not 0 <= args.default_index < 1000:
        raise ValueError(f"--default-index must be in [0, 1000) (the shipped sample's images), got "
                         f"{args.default_index}")
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise ValueError(f"--image {args.image!r} does not exist or is not a file")
        if args.images is not None or args.classes is not None:
            raise ValueError("--image FILE cannot be combined with --images or --classes")
    if args.default_index is not None and (args.model not in (None, "", "default") or args.images is not None
                                           or args.classes is not None):
        raise ValueError("--default-index applies to the shipped model and its sample only "
                         "(not with --model, --images or --classes)")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("nchains paths draws its attribution maps with matplotlib, which is not installed: "
                         "pip install 'nchains[plots]' (or matplotlib)")
    from nchains._util.publish import check_writable

    check_writable(args.out, out_problem, "--out", kind="paths output")
    return sparsities, target


def _one_image(args, warn) -> Tuple[Any, torch.Tensor, Dict[str, Any], Optional[List[str]]]:
    """(model, image Tensor[1, C, H, W], where it came from, class names)."""
    from nchains.models import zoo
    from nchains.models.spec import load_model, parse_model_spec, spec_class_names, spec_preprocessing

    if args.image is None and (args.images is not None or args.classes is not None):
        inputs = load_inputs(args, warn)
        if len(inputs.images) != 1:
            raise ValueError(f"paths explains one image; the options select {len(inputs.images)} ({inputs.what}): "
                             "use --per-class 1 with one class, --image FILE or --default-index K")
        return inputs.model, inputs.images, {"what": inputs.what, **inputs.source}, inputs.class_names
    spec = parse_model_spec(args.model, args.weights, args.num_classes)
    model = load_model(spec)
    if args.image is None:
        if spec["kind"] != "default":
            raise ValueError("--image FILE (or --images DIR) is required with a --model other than the default")
        k = 0 if args.default_index is None else args.default_index
        images, labels, indices = zoo.fashion_sample()
        image = zoo.normalize_fashion(images[k:k + 1]).unsqueeze(1)
        source = {"kind": "default-sample", "index": k, "label": zoo.FASHION_CLASSES[int(labels[k])],
                  "test_split_index": int(indices[k])}
        return model, image, source, zoo.default_class_names()
    from pathlib import Path

    from nchains.models.images import _preprocess, _read

    pre = spec_preprocessing(spec, in_channels(model))
    image = _preprocess(_read(Path(args.image), pre["grayscale"]), pre["preprocessing"], pre["size"],
                        pre["grayscale"]).unsqueeze(0)
    with torch.no_grad():
        n_out = model(image).shape[1]
    return model, image, {"kind": "file", "path": os.path.abspath(args.image), **pre}, spec_class_names(spec, n_out)


def _name(sparsity: float) -> str:
    return f"{sparsity:g}".replace(".", "_")


def cmd_paths(args) -> int:
    from nchains._util.publish import StagedFolder
    from nchains.critical_paths import critical_paths
    from nchains.critical_paths.path_file import path_bytes
    from nchains.critical_paths.plot import attribution_png

    sparsities, target = _check_args(args)
    chatty = not (args.quiet or args.json)

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    model, image, source, names = _one_image(args, warn)
    with StagedFolder(args.out, out_problem, arg="--out", kind="paths output") as staging:
        paths = critical_paths(model, image, sparsities, method=args.method, target=target, steps=args.steps,
                               progress=chatty)
        label = names[paths[0].target] if names is not None else str(paths[0].target)
        entries = []
        for sparsity, path in zip(sparsities, paths):
            stem = _name(sparsity)
            staging.write(f"path_{stem}.npz", path_bytes(path))
            title = f"{label}: {args.method} path, sparsity {path.sparsity:.4f} ({path.n_kept}/{path.n_total} neurons)"
            staging.write(f"attribution_{stem}.png", attribution_png(path.image, path.attribution(), title))
            entries.append({"file": f"path_{stem}.npz", "png": f"attribution_{stem}.png", **path.summary()})
        with torch.no_grad():
            logit = float(paths[0].logits[0, paths[0].target])
        summary = {"format": FORMAT, "version": 1, "method": args.method, "target": paths[0].target,
                   "target_label": label, "target_logit": logit, "image": source, "paths": entries}
        staging.write(SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
        staging.publish()
    if args.json:
        print(json.dumps(summary, indent=1))
    elif not args.quiet:
        print(_table(summary))
        print(f"\nwrote {args.out}")
    return 0


def _table(summary: Dict[str, Any]) -> str:
    """Neurons kept per site, one column per sparsity."""
    paths = summary["paths"]
    head = ["site", "label", "neurons"] + [f"s={p['requested_sparsity']:g}" for p in paths]
    rows = [[s["key"], s["label"], str(s["total"])] + [str(p["sites"][i]["kept"]) for p in paths]
            for i, s in enumerate(paths[0]["sites"])]
    rows.append(["total", "", str(paths[0]["total"])] + [str(p["kept"]) for p in paths])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"critical paths of {summary['target_label']} (logit {summary['target_logit']:.3f}), "
             f"method {summary['method']}"]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in [head, *rows]]
    return "\n".join(lines)
