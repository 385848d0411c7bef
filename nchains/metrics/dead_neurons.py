"""Dead-neuron prevalence (paper 2, Sec. 2.4, Fig. 1): the share of a path's neurons that were
dead (activation exactly 0) in the original network at the image.

A path chosen by the pruning objective may keep neurons that were originally dead and became
active only because other neurons were pruned; NeuronMCT and NeuronIntGrad give a dead neuron a
zero contribution (Remark 2), so their paths hold none when the threshold is positive.

Example:
    >>> p = nchains.critical_path(model, image, sparsity=0.99, method="mct")
    >>> dead_neuron_prevalence(p)["fraction"]          # 0.0
    >>> plot_prevalence({"mct": r1, "greedy": r2}, path="dead.png")
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from nchains._util.io import PathLike
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.instrument.taps import sites, tap
from nchains.metrics._common import fraction, mask_of, save_png

__all__ = ["dead_neuron_prevalence", "original_activations", "plot_prevalence"]


def original_activations(model: nn.Module, image: torch.Tensor, graph: Optional[ModelGraph] = None):
    """The activation of every neuron of every activation site of ``model`` at ``image``.

    Args:
        model (nn.Module): traceable network (eval mode is set; not modified).
        image (Tensor[1, C, H, W] or [C, H, W]): finite floats.
        graph (ModelGraph): ``nchains.analyze(model, image)`` to reuse.

    Returns:
        (dict site key -> Tensor[*site shape] without batch, list of Site) in execution order.
    """
    from nchains.critical_paths.path import check_image

    x = check_image(image, model)
    graph = graph_for(model, x.shape[1:], graph, example=x)
    chosen = sites(graph, "activations")
    with torch.no_grad():
        _, values = tap(graph, chosen)(x)
    return {k: v[0].detach() for k, v in values.items()}, chosen


def dead_neuron_prevalence(path, model: Optional[nn.Module] = None, image: Optional[torch.Tensor] = None,
                           graph: Optional[ModelGraph] = None) -> Dict[str, Any]:
    """The fraction of ``path``'s neurons whose original activation at ``image`` is exactly 0.

    "Dead" is ``a == 0`` in the unmodified network (for ReLU, ``a <= 0``); a neuron of a smooth
    activation (SiLU, GELU) is practically never dead.

    Args:
        path (CriticalPath or mapping str -> BoolTensor[*neuron shape]): the path; a mapping
            covers some or all activation sites of the model.
        model (nn.Module): the network; default the CriticalPath's (required for a mapping).
        image (Tensor[1, C, H, W] or [C, H, W]): default the CriticalPath's (required for a mapping).
        graph (ModelGraph): an analysis of ``model`` at the image's shape to reuse.

    Returns:
        dict: ``kept`` (neurons on the path), ``dead`` (of them originally dead), ``fraction``
        (dead / kept, None for an empty path), ``dead_overall`` (share of all neurons of the
        covered sites dead at the image: the prevalence a random path would have), and
        ``per_layer``: site key -> ``{"label", "kept", "dead", "fraction"}`` in execution order.

    Raises:
        TypeError, ValueError: a bad path, a missing model/image, or a mask that does not fit
            the model's sites (unknown key, wrong shape).
    """
    from nchains.critical_paths.path import CriticalPath

    mask = mask_of(path)
    if isinstance(path, CriticalPath):
        model = path.model if model is None else model
        image = path.image if image is None else image
        graph = path.graph if graph is None and model is path.model else graph
    if model is None or image is None:
        raise ValueError("model and image are required when path is a mask mapping (not a CriticalPath)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    acts, chosen = original_activations(model, image, graph)
    labels = {s.key: s.label for s in chosen}
    unknown = [k for k in mask if k not in acts]
    if unknown:
        raise ValueError(f"path: unknown site {unknown[0]!r}; accepted: the model's activation sites "
                         f"({', '.join(list(acts)[:4])}, ...)")
    per_layer, kept, dead, dead_all, total = {}, 0, 0, 0, 0
    for key in acts:
        if key not in mask:
            continue
        m, a = mask[key], acts[key]
        if tuple(m.shape) != tuple(a.shape):
            raise ValueError(f"path[{key!r}] must have the neuron shape {list(a.shape)}, got {list(m.shape)}")
        is_dead = a == 0
        k, d = int(m.sum()), int((is_dead & m.to(a.device)).sum())
        per_layer[key] = {"label": labels[key], "kept": k, "dead": d, "fraction": fraction(d, k)}
        kept, dead = kept + k, dead + d
        dead_all, total = dead_all + int(is_dead.sum()), total + a.numel()
    return {"kept": kept, "dead": dead, "fraction": fraction(dead, kept),
            "dead_overall": fraction(dead_all, total), "per_layer": per_layer}


def plot_prevalence(results: Mapping[str, Mapping[str, Any]], path: Optional[PathLike] = None):
    """Bars of dead-neuron prevalence per method (Fig. 1), with the network's overall dead share.

    Args:
        results (mapping name -> dict of :func:`dead_neuron_prevalence`): e.g. one per method
            (and sparsity: ``"greedy 99%"``); a result over several images may carry the mean
            ``fraction``.
        path (str or PathLike): where to write the PNG (atomically); None: only return the figure.

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping name -> dead_neuron_prevalence result")
    fig, ax = new_figure(1, width=max(4.0, 0.9 * len(results) + 2.0))
    names = list(results)
    values = [100.0 * (results[n].get("fraction") or 0.0) for n in names]
    bars = ax.bar(range(len(names)), values, color="tab:red")
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    overall = [r.get("dead_overall") for r in results.values() if r.get("dead_overall") is not None]
    if overall:
        ax.axhline(100.0 * sum(overall) / len(overall), color="gray", ls="--",
                   label="dead among all neurons")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("originally dead neurons on the path (%)")
    ax.set_title("Dead-neuron prevalence", fontsize=10)
    return save_png(fig, path)
