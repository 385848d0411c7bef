"""The ``nchains evaluate-paths`` command: the critical-paths paper's comparisons on a model.

Every path method (NeuronIntGrad, NeuronMCT, greedy pruning, DGR(init=1), DGR(init=r)) selects
a path per image and sparsity, the input methods (InputIntGrad, InputMCT) give their maps, and
:func:`nchains.baselines.evaluate.evaluate_paths` measures dead-neuron prevalence (Fig. 1),
Jaccard overlaps (Fig. 2), LeRF input degradation (Fig. 6a-c) and the randomisation sanity check
(Fig. 7). ``--out DIR`` gets ``results.json``, the PNG plots and (unless ``--no-paths``) every
path as ``path_<method>_<sparsity>_<image>.npz`` (:meth:`CriticalPath.save`'s format), all or
nothing. Without ``--model`` it runs on the shipped Fashion-MNIST ResNet and 10 of its test
images per class.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional

from nchains._util.publish import earlier_output_problem
from nchains.cli._inputs import add_input_args, check_input_args, csv_list, load_inputs

RESULTS = "results.json"
FORMAT = "nchains-evaluate-paths"
ALL_METHODS = "intgrad,mct,greedy,dgr1,dgr-random,input-intgrad,input-mct"


def add_command(sub) -> None:
    """Registers ``evaluate-paths`` on an argparse sub-parsers object."""
    from nchains.baselines.evaluate import SANITY_DEFAULT

    p = sub.add_parser("evaluate-paths", help="compare critical paths with the pruning baselines (dead neurons, "
                                              "Jaccard, LeRF, sanity check)",
                       description="Select the paths of every method on the images and compare them as the "
                                   "critical-paths paper does: dead-neuron prevalence, Jaccard overlaps, LeRF input "
                                   "degradation and the randomisation sanity check. Without --model it runs on the "
                                   "shipped Fashion-MNIST ResNet and 10 test images per class (100 images).")
    add_input_args(p, per_class_default=10)
    p.add_argument("--methods", default=ALL_METHODS, help=f"comma-separated methods (default {ALL_METHODS})")
    p.add_argument("--sparsity", default="0.9,0.99", help="comma-separated path sparsities in [0, 1] (default 0.9,0.99)")
    p.add_argument("--steps", type=int, default=50, help="integrated-gradient steps of intgrad and input-intgrad "
                                                         "(default 50)")
    p.add_argument("--dgr-steps", dest="dgr_steps", type=int, default=1000, help="DGR iterations (default 1000)")
    p.add_argument("--dgr-lam", dest="dgr_lam", type=float, default=0.01, help="DGR's L1 weight (default 0.01)")
    p.add_argument("--dgr-lr", dest="dgr_lr", type=float, default=0.01, help="DGR's SGD learning rate (default 0.01)")
    p.add_argument("--greedy-step", dest="greedy_step", type=float, default=0.01,
                   help="fraction of the kept neurons greedy pruning removes per step (default 0.01)")
    p.add_argument("--greedy-continue", dest="greedy_continue", action="store_true",
                   help="when greedy pruning runs out of neurons with a non-zero score, go on by original activation "
                        "(default: stop and report the sparsity reached)")
    p.add_argument("--batch", type=int, default=25, help="images per greedy / DGR run (default 25)")
    p.add_argument("--fill", choices=["zero", "mean", "blur"], default="zero",
                   help="LeRF's value of a removed pixel (default zero: the dataset mean after normalisation)")
    p.add_argument("--lerf-absolute", dest="lerf_absolute", action="store_true",
                   help="LeRF ranks pixels by the magnitude of their attribution (default: signed, as given)")
    p.add_argument("--sanity-images", dest="sanity_images", type=int, default=10,
                   help="images of the randomisation sanity check (default 10; 0: skip it)")
    p.add_argument("--sanity-methods", dest="sanity_methods", default=None,
                   help=f"attribution methods of the sanity check (default those of {','.join(SANITY_DEFAULT)} "
                        "among --methods, and gradient); path methods at the first --sparsity, re-selected on "
                        "every randomised model (greedy and DGR: a whole run per layer, slow)")
    p.add_argument("--no-paths", dest="no_paths", action="store_true", help="do not write the path files")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier evaluate-paths output)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table and no warnings")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_evaluate_paths)


def out_problem(folder: str) -> Optional[str]:
    """None when ``folder`` is empty or an earlier ``evaluate-paths`` output holding only its files."""
    return earlier_output_problem(
        folder, RESULTS, lambda results: results["files"] if results["format"] == FORMAT else None, "evaluate-paths")


def _methods(text: str, arg: str, accepted) -> List[str]:
    items = csv_list(text, arg)
    bad = [m for m in items if m not in accepted]
    if bad:
        raise ValueError(f"{arg}: unknown method {bad[0]!r}; accepted: {', '.join(accepted)}")
    return items


def _check_args(args):
    """Every check that needs no model: (methods, sparsities, Settings, sanity methods)."""
    from nchains._util.publish import check_writable
    from nchains.baselines.evaluate import SANITY_DEFAULT
    from nchains.baselines.methods import METHODS, REFERENCES, Settings
    from nchains.cli.paths import parse_sparsities

    check_input_args(args)
    methods = _methods(args.methods, "--methods", list(METHODS))
    sparsities = parse_sparsities(args.sparsity)
    for flag, value, low, high in (("--steps", args.steps, 1, 100_000), ("--dgr-steps", args.dgr_steps, 1, 1_000_000),
                                   ("--batch", args.batch, 1, 10_000), ("--sanity-images", args.sanity_images, 0,
                                                                        100_000)):
        if not low <= value <= high:
            raise ValueError(f"{flag} must be an int in [{low}, {high}], got {value}")
    for flag, value, high in (("--dgr-lam", args.dgr_lam, 1e6), ("--dgr-lr", args.dgr_lr, 1e6),
                              ("--greedy-step", args.greedy_step, 1.0)):
        if not (0.0 <= value <= high) or (flag != "--dgr-lam" and value == 0.0):
            low = "[0" if flag == "--dgr-lam" else "(0"
            raise ValueError(f"{flag} must be a number in {low}, {high:g}], got {value}")
    if args.sanity_methods is None:
        sanity = [m for m in SANITY_DEFAULT if m in methods or m in REFERENCES]
    else:
        sanity = _methods(args.sanity_methods, "--sanity-methods", [*methods, *REFERENCES])
    settings = Settings(steps=args.steps, greedy_step=args.greedy_step, greedy_continue=args.greedy_continue,
                        dgr_steps=args.dgr_steps, dgr_lam=args.dgr_lam, dgr_lr=args.dgr_lr, batch=args.batch,
                        seed=args.seed)
    check_writable(args.out, out_problem, "--out", kind="evaluate-paths output")
    return methods, sparsities, settings, sanity


def _name(sparsity: float) -> str:
    return f"{sparsity:g}".replace(".", "_")


def _plots(results: Dict[str, Any], labels: Dict[str, str]) -> Dict[str, bytes]:
    """The PNGs: dead-neuron bars, a Jaccard figure per sparsity, LeRF curves, sanity curves."""
    from nchains.metrics import plot_degradation, plot_jaccard, plot_prevalence, plot_sanity
    from nchains.neurochains.analyses.plots import png_bytes

    figs = {}
    if results["dead_neurons"]:
        figs["dead_neurons.png"] = plot_prevalence(results["dead_neurons"])
    for s, matrix in results["jaccard"].items():
        figs[f"jaccard_{_name(float(s))}.png"] = plot_jaccard(matrix, labels=labels)
    figs["lerf.png"] = plot_degradation(results["lerf"], "change")
    if results["sanity"]:
        figs["sanity.png"] = plot_sanity(results["sanity"])
    return {name: png_bytes(fig) for name, fig in figs.items()}


def _warn_short(results: Dict[str, Any], warn) -> None:
    for s, reached in results["reached"].get("greedy", {}).items():
        short = [r for r in reached if r < float(s) - 1e-9]
        if short:
            warn(f"greedy pruning ran out of neurons with a non-zero score before sparsity {s} at {len(short)} of "
                 f"{len(reached)} images (reached {min(short):.4f} to {max(short):.4f}); their paths are the ones "
                 "reached (--greedy-continue goes on by original activation)")


def cmd_evaluate_paths(args) -> int:
    from nchains._util.publish import StagedFolder
    from nchains.baselines.evaluate import evaluate_paths
    from nchains.critical_paths.path_file import path_bytes

    methods, sparsities, settings, sanity = _check_args(args)
    chatty = not (args.quiet or args.json)

    def warn(text: str) -> None:
        if not args.quiet:
            print(f"nchains: warning: {text}", file=sys.stderr)

    inputs = load_inputs(args, warn)
    if chatty:
        print(f"evaluating {', '.join(methods)} at sparsity {', '.join(f'{s:g}' for s in sparsities)} on "
              f"{inputs.what}", file=sys.stderr)
    with StagedFolder(args.out, out_problem, arg="--out", kind="evaluate-paths output") as staging:
        files: List[str] = []

        def on_path(method, i, s, path):
            if not args.no_paths:
                name = f"path_{method}_{_name(s)}_{i:04d}.npz"
                staging.write(name, path_bytes(path, contributions=False))
                files.append(name)

        results = evaluate_paths(inputs.model, inputs.images, methods, sparsities, settings, fill=args.fill,
                                 lerf_absolute=args.lerf_absolute,
                                 sanity_images=args.sanity_images, sanity_methods=sanity, on_path=on_path,
                                 progress=chatty)
        labels = _site_labels(inputs.model, inputs.images)
        pngs = _plots(results, labels)
        for name, data in pngs.items():
            staging.write(name, data)
        doc = {"format": FORMAT, "version": 1, "model": inputs.spec, "images": {"what": inputs.what,
               "count": len(inputs.images), "source": inputs.source}, "class_names": inputs.class_names,
               "site_labels": labels, **results, "plots": sorted(pngs), "files": sorted(pngs) + files}
        staging.write(RESULTS, (json.dumps(doc, indent=1, default=str) + "\n").encode())
        staging.publish()
    _warn_short(results, warn)
    if args.json:
        print(json.dumps(summary(doc), indent=1))
    elif not args.quiet:
        print(table(doc))
        print(f"\nwrote {args.out}")
    return 0


def _site_labels(model, images) -> Dict[str, str]:
    from nchains.graph.analysis import analyze
    from nchains.instrument.taps import sites

    return {s.key: s.label for s in sites(analyze(model, images[:1]), "activations")}


def summary(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The headline numbers of a results document: dead share, mean reached sparsity, LeRF AUC,
    Jaccard matrices (network-wise) and the sanity check's final similarities."""
    reached = {f"{m} {s}": sum(v) / len(v) for m, per in doc["reached"].items() for s, v in per.items()}
    return {"images": doc["images"]["count"], "dead_fraction": {k: v["fraction"] for k, v in doc["dead_neurons"].items()},
            "mean_sparsity_reached": reached,
            "lerf_auc_change": {k: v["auc"]["change"] for k, v in doc["lerf"].items()},
            "jaccard": {s: {"names": j["names"], "matrix": j["matrix"]} for s, j in doc["jaccard"].items()},
            "sanity_last": {k: {q: v[q][-1] for q in ("spearman", "spearman_abs", "ssim")}
                            for k, v in doc["sanity"].items()}}


def table(doc: Dict[str, Any]) -> str:
    """Dead-neuron share and LeRF AUC per method, and each path's Jaccard with NeuronIntGrad."""
    s = summary(doc)
    lines = [f"{s['images']} images; dead-neuron share of the paths (network: "
             f"{_pct(next(iter(doc['dead_neurons'].values()), {}).get('dead_overall'))} of all neurons dead)"]
    width = max([len(k) for k in [*s["dead_fraction"], *s["lerf_auc_change"]]] + [10])
    for (m, per) in doc["reached"].items():
        for sp, values in per.items():
            name = next(k for k, v in doc["names"].items() if v == [m, float(sp)])
            lines.append(f"  {name.ljust(width)}  dead {_pct(s['dead_fraction'].get(name)):>6}  "
                         f"sparsity reached {sum(values) / len(values):.4f}")
    lines.append("LeRF AUC of |Φ(x̃) − Φ(x)| / |Φ(x)| (lower is better)")
    for name, auc in sorted(s["lerf_auc_change"].items(), key=lambda kv: kv[1]):
        lines.append(f"  {name.ljust(width)}  {auc:.4f}")
    for sp, j in s["jaccard"].items():
        if len(j["names"]) < 2:  # one path method: nothing to compare it with
            continue
        lines.append(f"Jaccard with {j['names'][0]} at sparsity {sp}: " +
                     ", ".join(f"{n} {v:.3f}" for n, v in zip(j["names"][1:], j["matrix"][0][1:])))
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
