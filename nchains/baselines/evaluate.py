"""Every path method on the same images, and the paper's comparisons of them (Figs. 1, 2, 6, 7).

:func:`evaluate_paths` selects the paths of each method (:mod:`.methods`) for every image and
sparsity, and measures, with :mod:`nchains.metrics`:

- ``dead_neurons`` (Fig. 1): per method and sparsity, the share of the path's neurons that were
  originally dead, averaged over the images (``fraction``), pooled (``pooled``: dead / kept over
  all images) and per site; the network's own dead share (``dead_overall``) for reference;
- ``jaccard`` (Fig. 2): per sparsity, the Jaccard matrix of the methods' paths, network-wise and
  per site, each image's matrix averaged over the images;
- ``lerf`` (Fig. 6a-c): input degradation, least relevant pixels first, of each method's
  attribution (path gradients of the path methods, the input methods' maps, and the
  ``gradient`` / ``random`` references), per-image curves dropped, per-image AUCs kept;
- ``sanity`` (Fig. 7): the cascading randomisation check of the chosen attribution methods on
  an evenly spaced subset of the images, the path methods at one sparsity (they re-select
  their path on every randomised model: greedy and DGR there cost their whole run per layer).

Greedy pruning may stop short of a sparsity (:mod:`.greedy`); ``reached`` records the sparsity
each path actually has, and its metrics are those of the path it returned.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from nchains.baselines.greedy import GreedyStoppedEarly
from nchains.baselines.methods import INPUT_METHODS, METHODS, PATH_METHODS, REFERENCES, Settings, \
    attribution_method, display_name, method_paths

__all__ = ["SANITY_DEFAULT", "evaluate_paths"]

#: Attribution methods of the sanity check by default: the cheap ones (no greedy/DGR run per layer).
SANITY_DEFAULT = ("intgrad", "mct", "input-intgrad", "input-mct", "gradient")
#: Called with (method, image index, sparsity, CriticalPath) for every path while it exists.
OnPath = Callable[[str, int, float, Any], None]


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _dead_summary(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Dead-neuron prevalence of one method and sparsity over the images."""
    kept, dead = sum(r["kept"] for r in results), sum(r["dead"] for r in results)
    per_layer = {}
    for key, first in results[0]["per_layer"].items():
        k = sum(r["per_layer"][key]["kept"] for r in results)
        d = sum(r["per_layer"][key]["dead"] for r in results)
        per_layer[key] = {"label": first["label"], "kept": k, "dead": d, "pooled": d / k if k else None}
    return {"fraction": _mean([r["fraction"] for r in results]), "pooled": dead / kept if kept else None,
            "dead_overall": _mean([r["dead_overall"] for r in results]), "kept": kept, "dead": dead,
            "per_image": [r["fraction"] for r in results], "per_layer": per_layer}


def _mean_jaccard(per_image: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The element-wise mean of jaccard_matrix results (same names and sites)."""
    first = per_image[0]
    out = {"names": first["names"], "matrix": np.mean([r["matrix"] for r in per_image], axis=0).tolist()}
    if "per_layer" in first:
        out["layers"] = first["layers"]
        out["per_layer"] = {k: np.mean([r["per_layer"][k] for r in per_image], axis=0).tolist()
                            for k in first["layers"]}
    return out


def _collect_paths(model, images, targets, methods, sparsities, settings, graph, on_path, bar):
    """Runs every path method; returns (masks, dead, maps, reached) keyed by (method, sparsity)."""
    from nchains.metrics import dead_neuron_prevalence

    masks, dead, maps, reached = {}, {}, {}, {}
    for method in [m for m in methods if m in PATH_METHODS]:
        step = settings.batch if method in ("greedy", "dgr1", "dgr-random") else 1
        for start in range(0, len(images), step):
            bar.set_description(f"paths: {display_name(method)}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GreedyStoppedEarly)  # recorded in ``reached`` instead
                rows = method_paths(method, model, images[start:start + step], targets[start:start + step],
                                    sparsities, settings, graph)
            for i, row in enumerate(rows, start):
                for s, path in zip(sparsities, row):
                    key = (method, s)
                    masks.setdefault(key, []).append(path.mask)
                    dead.setdefault(key, []).append(dead_neuron_prevalence(path, graph=graph))
                    maps.setdefault(key, []).append(path.attribution().detach())
                    reached.setdefault(key, []).append(path.sparsity)
                    if on_path is not None:
                        on_path(method, i, s, path)
            bar.update(len(rows))
    return masks, dead, maps, reached


def _input_maps(model, images, targets, methods, settings, bar) -> Dict[str, torch.Tensor]:
    maps = {}
    for method in [m for m in methods if m in INPUT_METHODS] + list(REFERENCES):
        bar.set_description(f"attributions: {display_name(method)}")
        maps[method] = attribution_method(method, settings)(model, images, targets).detach()
        bar.update(len(images) if method in INPUT_METHODS else 0)
    return maps


def _strip(result: Dict[str, Any]) -> Dict[str, Any]:
    """A lerf / sanity result without its per-image curves (they dominate the JSON)."""
    out = dict(result)
    out.pop("per_image", None)
    for k in ("logit", "probability", "change"):
        if isinstance(out.get(k), dict):
            out[k] = {a: b for a, b in out[k].items() if a != "per_image"}
    return out


def evaluate_paths(model: nn.Module, images: torch.Tensor, methods: Sequence[str] = tuple(METHODS),
                   sparsities: Sequence[float] = (0.9, 0.99), settings: Optional[Settings] = None, *,
                   fractions: Optional[Sequence[float]] = None, fill: str = "zero", lerf_absolute: bool = False,
                   sanity_images: int = 10,
                   sanity_methods: Sequence[str] = SANITY_DEFAULT, sanity_sparsity: Optional[float] = None,
                   on_path: Optional[OnPath] = None, progress: bool = False) -> Dict[str, Any]:
    """Selects every method's paths on ``images`` and compares them (see the module docstring).

    Args:
        model (nn.Module): a traceable ReLU classifier (eval mode is set; not modified).
        images (Tensor[N, C, H, W]): finite floats; the target of each is the model's prediction.
        methods (sequence of str): names of :data:`nchains.baselines.methods.METHODS`.
        sparsities (sequence of float): in [0, 1], for every path method.
        settings (Settings): how the methods run (default ``Settings()``).
        fractions (sequence of float): LeRF's fractions (default ``nchains.metrics.DEFAULT_FRACTIONS``).
        fill (str): LeRF's fill of removed pixels (``"zero"``, ``"mean"``, ``"blur"``).
        lerf_absolute (bool): LeRF ranks pixels by the magnitude of their attribution (default: signed).
        sanity_images (int): images of the sanity check (0: no sanity check).
        sanity_methods (sequence of str): attribution methods of the sanity check (those among
            ``methods`` or :data:`REFERENCES`).
        sanity_sparsity (float): the path methods' sparsity in the sanity check (default the
            first of ``sparsities``; one only: each costs a path selection per image and layer).
        on_path (callable): ``on_path(method, image_index, sparsity, path)`` for every path.
        progress (bool): tqdm bars.

    Returns:
        dict (JSON-able): ``methods``, ``sparsities``, ``targets``, ``reached`` (method ->
        sparsity -> per image), ``dead_neurons``, ``jaccard``, ``lerf``, ``sanity`` (keyed by
        display names such as ``"NeuronIntGrad 90%"``), ``names`` (display name -> (method, sparsity)).

    Raises:
        TypeError, ValueError: on a bad argument (before the long work).
    """
    from tqdm.auto import tqdm

    from nchains._util.device import model_device_dtype
    from nchains._util.tensors import check_images
    from nchains.baselines._batch import check_sparsities
    from nchains.graph.analysis import graph_for
    from nchains.metrics import jaccard_matrix, lerf, randomisation_sanity

    settings = Settings() if settings is None else settings
    methods = _check_methods(methods, METHODS, "methods")
    sanity_methods = _check_methods(sanity_methods, [*methods, *REFERENCES], "sanity_methods", allow_empty=True)
    sparsities = check_sparsities(list(sparsities))
    if sanity_sparsity is not None:
        check_sparsities(sanity_sparsity)
    if isinstance(sanity_images, bool) or not isinstance(sanity_images, int) or sanity_images < 0:
        raise ValueError(f"sanity_images must be an int >= 0, got {sanity_images!r}")
    if not isinstance(lerf_absolute, bool):
        raise TypeError(f"lerf_absolute must be a bool, got {type(lerf_absolute).__name__}")
    check_images(images)
    model.eval()
    x = images.detach().to(*model_device_dtype(model))
    graph = graph_for(model, x.shape[1:], example=x[:1])
    with torch.no_grad():
        targets = model(x).argmax(1)
    n_work = len(x) * (sum(m in PATH_METHODS for m in methods) + sum(m in INPUT_METHODS for m in methods))
    bar = tqdm(total=n_work, unit="img", disable=not progress)
    masks, dead, path_maps, reached = _collect_paths(model, x, targets, methods, sparsities, settings, graph,
                                                     on_path, bar)
    maps = {display_name(m, s): torch.cat(v) for (m, s), v in path_maps.items()}
    names = {display_name(m, s): [m, s] for (m, s) in path_maps}
    for method, value in _input_maps(model, x, targets, methods, settings, bar).items():
        maps[display_name(method)] = value
        names[display_name(method)] = [method, None]
    bar.close()
    results: Dict[str, Any] = {"methods": list(methods), "sparsities": sparsities, "targets": targets.tolist(),
                               "names": names, "settings": settings.__dict__.copy()}
    results["reached"] = {m: {str(s): reached[(m, s)] for s in sparsities} for m in methods if m in PATH_METHODS}
    results["dead_neurons"] = {display_name(m, s): _dead_summary(v) for (m, s), v in dead.items()}
    results["jaccard"] = {}
    for s in sparsities:
        chosen = [m for m in methods if m in PATH_METHODS]
        if chosen:
            per_image = [jaccard_matrix({display_name(m): masks[(m, s)][i] for m in chosen}, per_layer=True)
                         for i in range(len(x))]
            results["jaccard"][str(s)] = _mean_jaccard(per_image)
    results["lerf"] = {name: _strip(lerf(model, x, value, fractions, fill, target=targets, absolute=lerf_absolute,
                                         progress=progress))
                       for name, value in maps.items()}
    results["sanity"] = {}
    if sanity_images and sanity_methods:
        idx = torch.linspace(0, len(x) - 1, min(sanity_images, len(x))).round().long().unique()
        s = sparsities[0] if sanity_sparsity is None else sanity_sparsity
        for method in sanity_methods:
            fn = attribution_method(method, settings, s if method in PATH_METHODS else None)
            r = randomisation_sanity(fn, model, x[idx], target=targets[idx], seed=settings.seed, progress=progress)
            results["sanity"][display_name(method, s if method in PATH_METHODS else None)] = _strip(r)
        results["sanity_images"] = idx.tolist()
    return results


def _check_methods(methods, accepted, name: str, allow_empty: bool = False) -> List[str]:
    if isinstance(methods, str) or not isinstance(methods, Sequence):
        raise TypeError(f"{name} must be a sequence of method names, got {type(methods).__name__}")
    bad = [m for m in methods if m not in accepted]
    if bad:
        raise ValueError(f"{name}: unknown method {bad[0]!r}; accepted: {', '.join(accepted)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"{name} must not repeat a method, got {list(methods)}")
    if not methods and not allow_empty:
        raise ValueError(f"{name} must name at least one method; accepted: {', '.join(accepted)}")
    return list(methods)
