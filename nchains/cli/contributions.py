"""The ``nchains contributions`` command: contributions of every layer's channels or neurons.

Runs :func:`nchains.contributions` on the model and images of the shared options
(:mod:`nchains.cli._inputs`; the shipped model and images by default) and writes one ``.npz``
(atomically): one array per site (key = the site key, e.g. ``layer1.0.relu@1``; Tensor[N, C] or
the neuron shape), ``target`` [N], ``logits`` [N, K] and, for intgrad, ``delta__<key>`` [N] (the
completeness error per image). ``--json`` prints the top channels of each site instead of the
table.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, Dict, List, Union

from nchains.cli._inputs import add_input_args, check_input_args, load_inputs, parse_target

MAX_STEPS = 100_000
RESERVED = ("target", "logits")


def add_command(sub) -> None:
    """Registers ``contributions`` on an argparse sub-parsers object."""
    p = sub.add_parser("contributions", help="contributions of every layer's channels or neurons to a logit",
                       description="Contributions of the channels (or neurons) of every activation call or conv unit "
                                   "to the target logit: taylor (a*dPhi/da, one forward and one backward), intgrad "
                                   "(neuron integrated gradients, zero baseline) or ablation (exact "
                                   "Phi(x) - Phi(x; channel = 0)). Writes one .npz: an array per site, target, "
                                   "logits (and delta__<site> for intgrad). Without --model it runs on the shipped "
                                   "Fashion-MNIST ResNet and its shipped images.")
    add_input_args(p, per_class_default=2)
    p.add_argument("--method", choices=["taylor", "intgrad", "ablation"], default="taylor",
                   help="taylor, intgrad or ablation (default taylor)")
    p.add_argument("--layers", default="activations",
                   help="'activations' (every activation call, default), 'units' (every conv unit), or "
                        "comma-separated module paths (each call its own site)")
    p.add_argument("--unit", choices=["channel", "neuron"], default="channel",
                   help="channel: [N, C] per site (default); neuron: the activation's shape (not with ablation)")
    p.add_argument("--absolute", action="store_true", help="|contribution| per neuron, before the channel sum")
    p.add_argument("--target", default="pred", help="'pred' (each image's predicted class, default) or a class index")
    p.add_argument("--steps", type=int, default=50, help="intgrad steps (default 50)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="intgrad/ablation rows per suffix run (default: by a 256 MB memory budget)")
    p.add_argument("--out", default="contrib.npz", help="output .npz file (default contrib.npz)")
    p.add_argument("--top", type=int, default=5, help="channels shown per site (default 5)")
    p.add_argument("--json", action="store_true", help="print the top channels per site as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table and no warnings")
    p.set_defaults(func=cmd_contributions)


def _layers(text: str) -> Union[str, List[str]]:
    if text in ("activations", "units"):
        return text
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--layers must be 'activations', 'units' or comma-separated module paths, got {text!r}")
    return items


def _check_args(args) -> None:
    """Every check that needs no model, before anything is loaded."""
    from nchains.cli._outputs import check_output_file

    check_input_args(args)
    parse_target(args.target)
    _layers(args.layers)
    if not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps must be an int in [1, {MAX_STEPS}], got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be an int >= 1, got {args.batch_size}")
    if args.top < 1:
        raise ValueError(f"--top must be an int >= 1, got {args.top}")
    if args.method == "ablation" and args.unit != "channel":
        raise ValueError("--unit neuron does not apply to --method ablation (a channel is zeroed at a time)")
    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must name a .npz file, got {args.out!r}")
    check_output_file(args.out)


def npz_bytes(c) -> bytes:
    """The ``.npz`` of a :class:`~nchains.contrib.Contributions` (float arrays on the CPU)."""
    import numpy as np

    clash = [k for k in c if k in RESERVED or k.startswith("delta__")]
    if clash:
        raise ValueError(f"site key {clash[0]!r} clashes with an array name of the .npz ({', '.join(RESERVED)}, "
                         "delta__*)")
    arrays = {k: v.detach().cpu().numpy() for k, v in c.items()}
    arrays["target"] = c.target.cpu().numpy()
    arrays["logits"] = c.logits.detach().cpu().numpy()
    for k, d in (c.delta or {}).items():
        arrays[f"delta__{k}"] = d.detach().cpu().numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def summary(c, top: int, class_names) -> Dict[str, Any]:
    """Per site the ``top`` channels by their contribution averaged over the images."""
    from nchains.graph.labels import filter_label

    targets = c.target.tolist()
    out = {"method": c.method, "unit": c.unit, "absolute": c.absolute, "images": len(targets), "target": targets,
           "sites": []}
    if class_names is not None:
        out["target_names"] = [class_names[t] if 0 <= t < len(class_names) else str(t) for t in targets]
    for s in c.sites:
        entry = {"key": s.key, "label": s.label, "module": s.module, "call": s.call, "channels": s.shape[1],
                 "top": [{"label": filter_label(s.label, i), "index": i, "value": v} for i, v in c.top(s.key, top)]}
        if c.delta is not None:
            entry["max_abs_delta"] = float(c.delta[s.key].abs().max())
        out["sites"].append(entry)
    return out


def _table(info: Dict[str, Any]) -> str:
    lines = [f"{info['method']} contributions ({info['unit']}{', absolute' if info['absolute'] else ''}) of "
             f"{info['images']} images, top channels per site (mean over the images)"]
    width = max(len(s["key"]) for s in info["sites"])
    for s in info["sites"]:
        tops = ", ".join(f"{t['label']} {t['value']:+.4g}" for t in s["top"])
        lines.append(f"  {s['key'].ljust(width)}  {tops}")
    return "\n".join(lines)


def cmd_contributions(args) -> int:
    from nchains._util.io import write_atomic
    from nchains.contrib import contributions

    _check_args(args)

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    inputs = load_inputs(args, warn)
    c = contributions(inputs.model, inputs.images, target=parse_target(args.target), method=args.method,
                      layers=_layers(args.layers), unit=args.unit, absolute=args.absolute, steps=args.steps,
                      batch_size=args.batch_size, progress=not (args.quiet or args.json))
    write_atomic(args.out, npz_bytes(c))
    info = summary(c, args.top, inputs.class_names)
    if args.json:
        print(json.dumps({**info, "out": args.out}, indent=1))
    elif not args.quiet:
        print(_table(info))
        print(f"\nwrote {args.out} ({len(c)} sites, {inputs.what})")
    return 0
