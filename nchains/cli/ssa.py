"""The ``nchains ssa`` command: step-wise sensitivity analysis of a model, one dependency graph
per class, clustered across classes.

Every argument is checked, and ``--out`` is checked replaceable, before the model is loaded.
The images of each class are analysed for that class's output. The output folder is written
all-or-nothing (:class:`nchains._util.publish.StagedFolder`): per class ``<k>-<class>.json``,
``.graphml``, ``.dot`` and a ``.svg`` picture (graphviz ``dot`` when installed, else
matplotlib), ``dendrogram.png`` (two classes or more) and ``summary.json``, which names every
other file (``classes[].files``, ``clusters.file``). An existing ``--out`` is replaced only when
it is empty or an earlier ``nchains ssa`` result holding only those files.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from nchains._util.publish import earlier_output_problem
from nchains.cli._inputs import add_input_args, check_input_args, load_inputs

SUMMARY = "summary.json"
SUMMARY_FORMAT = "nchains-ssa"
MAX_BRANCHING = 10**6


def add_command(sub) -> None:
    """Registers ``ssa`` on an argparse sub-parsers object."""
    p = sub.add_parser("ssa", help="step-wise sensitivity analysis: dependency graphs of relevant neurons per class",
                       description="Step-wise sensitivity analysis (SSA): for each class, from its logit down to the "
                                   "first conv layer, the positive Tukey outliers of one-step relevance, ranked by "
                                   "frequency across the class's images, top --branching per neuron; then Ward "
                                   "clustering of the classes' graphs. Without --model it runs on the shipped "
                                   "Fashion-MNIST ResNet and its images.")
    add_input_args(p, per_class_default=100, confident_default=None)  # the whole sample of a class can be used
    actions = {a.dest: a for a in p._actions}
    actions["classes"].help += "; 'all' (the default): every class"
    p.add_argument("--branching", type=int, default=3, help="lower neurons kept per upper neuron (default 3)")
    p.add_argument("--response", choices=["mean", "max"], default="mean",
                   help="response of an upper conv channel: its spatial mean (default) or maximum")
    p.add_argument("--chunk", type=int, default=50, help="images per forward/backward (memory; default 50)")
    p.add_argument("--weighting", choices=["frequency", "binary"], default="frequency",
                   help="bag-of-nodes weights for the clustering (default frequency)")
    p.add_argument("--engine", choices=["auto", "dot", "matplotlib"], default="auto",
                   help="what draws the pictures (default: graphviz dot when installed, else matplotlib)")
    p.add_argument("--out", default="ssa", help="output folder (default ./ssa)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no table and no warnings")
    p.add_argument("--json", action="store_true", help="print summary.json's content instead of the table")
    p.set_defaults(func=cmd_ssa)


def _written(summary: Dict[str, Any]) -> Optional[List[str]]:
    """The files beside ``summary.json`` that an ``nchains ssa`` summary names (None for a
    summary of another kind)."""
    if summary.get("format") != SUMMARY_FORMAT:
        return None
    files = [name for c in summary["classes"] for name in c["files"].values()]
    return files + ([summary["clusters"]["file"]] if summary["clusters"] is not None else [])


def _replace_problem(folder: str) -> Optional[str]:
    """None when ``folder`` may be replaced: empty, or an earlier ``nchains ssa`` result holding
    only the files its summary names."""
    return earlier_output_problem(folder, SUMMARY, _written, "ssa")


def _check_args(args) -> None:
    if args.classes is not None and args.classes.strip() == "all":
        args.classes = None
    check_input_args(args)
    if not 1 <= args.branching <= MAX_BRANCHING:
        raise ValueError(f"--branching must be between 1 and {MAX_BRANCHING}, got {args.branching}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if args.engine == "dot":
        import shutil

        if shutil.which("dot") is None:
            raise ValueError("--engine dot needs graphviz's dot on PATH (apt install graphviz); use --engine auto")


def _default_groups(inputs) -> List[Tuple[str, int, torch.Tensor]]:
    from nchains.models import zoo

    src = inputs.source
    _, labels, _ = zoo.default_images(src["classes"], per_class=src["per_class"], seed=src["seed"],
                                      confident=src["confident"])
    return _split(inputs.images, labels.tolist(), inputs.class_names)


def _split(images, targets: List[int], names: List[str]) -> List[Tuple[str, int, torch.Tensor]]:
    out, seen = [], []
    for t in targets:
        if t not in seen:
            seen.append(t)
    for t in seen:
        rows = torch.tensor([i for i, x in enumerate(targets) if x == t])
        out.append((names[t], t, images[rows]))
    return out


def _folder_groups(inputs, n_out: int) -> List[Tuple[str, int, torch.Tensor]]:
    from nchains.models.class_names import name_classes
    from nchains.models.image_source import folder_selection
    from nchains.models.spec import spec_class_names

    sel = folder_selection(inputs.source)
    if sel.labels is None:
        raise ValueError(f"--images {inputs.source['path']!r} is a flat folder; nchains ssa needs one sub-folder per "
                         "class (each class is analysed for its own output)")
    naming = name_classes(sel.folder_classes, spec_class_names(inputs.spec, n_out), n_out,
                          default_model=inputs.spec.get("kind") == "default")
    if naming.output_of is None:
        raise ValueError(f"--images sub-folders {sel.folder_classes} do not name the model's outputs; nchains ssa "
                         "needs to know which output each class is")
    names = naming.class_names
    return _split(sel.images, [naming.output_of[int(c)] for c in sel.labels], names)


def _groups(inputs) -> List[Tuple[str, int, torch.Tensor]]:
    """(class name, output index, images) per class, in the order the classes were asked for."""
    if inputs.source.get("kind") == "default":
        return _default_groups(inputs)
    with torch.no_grad():
        n_out = int(inputs.model(inputs.images[:1]).shape[1])
    return _folder_groups(inputs, n_out)


def _file_stem(target: int, name: str) -> str:
    return f"{target:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'class'}"


def _write(stage, graphs, clusters, meta: Dict[str, Any], engine: str) -> Dict[str, Any]:
    """Every file of the result into the staging folder; returns the summary."""
    from nchains.ssa.render import render

    classes, used = [], set()
    for name, g in graphs.items():
        stem = _file_stem(g.target, name)
        files = {ext: f"{stem}.{ext}" for ext in ("json", "graphml", "dot", "svg")}
        for ext in ("json", "graphml", "dot"):
            g.save(os.path.join(stage.path, files[ext]))
        used.add(render(g, os.path.join(stage.path, files["svg"]), engine=engine))
        classes.append({"name": name, "target": g.target, "images": g.num_images, "nodes": len(g.nodes),
                        "edges": len(g.edges), "nodes_per_layer": g.nodes_per_layer(), "files": files})
    summary = {"format": SUMMARY_FORMAT, "version": 1, **meta, "picture_engine": sorted(used),
               "classes": classes, "clusters": None}
    if clusters is not None:
        clusters.plot(os.path.join(stage.path, "dendrogram.png"))
        summary["clusters"] = {**clusters.summary(), "file": "dendrogram.png"}
    stage.write(SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def _table(summary: Dict[str, Any]) -> str:
    rows = [f"{'class':<14} {'output':>6} {'images':>6} {'nodes':>6} {'edges':>6}  nodes per layer"]
    for c in summary["classes"]:
        layers = " ".join(f"{k}:{v}" for k, v in c["nodes_per_layer"].items())
        rows.append(f"{c['name']:<14} {c['target']:>6} {c['images']:>6} {c['nodes']:>6} {c['edges']:>6}  {layers}")
    cl = summary["clusters"]
    if cl is not None:
        best = max(cl["shared"], key=lambda s: s["nodes"])
        rows.append(f"most shared: {best['classes'][0]} & {best['classes'][1]} ({best['nodes']} nodes, "
                    f"{best['edges']} edges)")
    return "\n".join(rows)


def cmd_ssa(args) -> int:
    from nchains._util.publish import StagedFolder, check_writable
    from nchains.graph.analysis import analyze
    from nchains.ssa import ssa, ssa_clusters

    _check_args(args)
    check_writable(args.out, _replace_problem, arg="--out", kind="ssa output")
    chatty = not (args.quiet or args.json)

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    start = time.perf_counter()
    inputs = load_inputs(args, warn)
    groups = _groups(inputs)
    if chatty:
        print(f"step-wise sensitivity analysis of {inputs.spec.get('name', 'the default model')} on {inputs.what}, "
              f"{len(groups)} classes, b={args.branching}", file=sys.stderr)
    graph = analyze(inputs.model, groups[0][2][:1])
    graphs = {}
    for name, target, images in groups:
        graphs[name] = ssa(inputs.model, images, target=target, branching=args.branching, response=args.response,
                           chunk=args.chunk, progress=chatty, graph=graph, class_name=name)
    clusters = ssa_clusters(graphs, weighting=args.weighting) if len(graphs) >= 2 else None
    meta = {"model": inputs.spec, "images": inputs.source, "branching": args.branching, "response": args.response,
            "weighting": args.weighting, "seconds": round(time.perf_counter() - start, 1)}
    with StagedFolder(args.out, _replace_problem, arg="--out", kind="ssa output") as stage:
        summary = _write(stage, graphs, clusters, meta, args.engine)
        stage.publish()
    if args.json:
        print(json.dumps(summary, indent=1))
    elif not args.quiet:
        print(_table(summary))
        print(f"\nwrote {args.out}/ ({len(graphs)} classes, {summary['seconds']} s)")
    return 0
