"""Step-wise sensitivity analysis (SSA; Algorithm 1 of ``stepwise_sensitivity_analysis.txt``):
from the target logit down to the first conv layer, one back-propagation step at a time.

The wrapper: ``S = {(classifier, target)}``. The units are visited in reverse topological order
of the unit DAG, so a unit's set of relevant neurons is complete (every consumer has added its
picks) when it is visited. For a unit ``U`` with neurons ``S_U`` and each producer ``P`` of ``U``
(the adjacency rule of :mod:`nchains.ssa.step`): STEP 1 relevance ``omega[n, i, k]`` for every
``n`` in ``S_U``, image ``i`` and channel ``k`` of ``P`` (:func:`~nchains.ssa.step.step_relevance`),
STEPS 2-4 Tukey outliers, frequency, top ``branching`` (:mod:`nchains.ssa.outliers`); the picks
become edges ``(U, n) -> (P, k)`` and join ``S_P``. Units without producers (the first conv
layer) end the walk.

Cost: one forward of the model per chunk of images (without autograd; every unit's output is
kept when all fit in :data:`CACHE_BYTES`, else recomputed up to the producers at each step),
then per visited unit and chunk the segment from its producers to ``U`` and one batched VJP
for all of ``S_U`` (each neuron computing only its own channel of ``U`` where ``U`` is a plain
conv/linear, BN, activation: :mod:`nchains.ssa.step`). Step graphs are built once per analysis
and reused for every class.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.io import hash_tensor
from nchains._util.tensors import check_images
from nchains.graph.analysis import ModelGraph, analyze
from nchains.ssa._schema import canonical, check_int
from nchains.ssa.dependency_graph import DependencyGraph
from nchains.ssa.outliers import OutlierCounts, select_top
from nchains.ssa.step import RESPONSES, prefix_graph, step_graph, step_relevance

__all__ = ["ssa"]

MAX_BRANCHING = 10**6
#: Every unit's output on all the images is kept (on the model's device) when it fits in this.
CACHE_BYTES = 2**30
_GRAPHS: "weakref.WeakKeyDictionary[ModelGraph, dict]" = weakref.WeakKeyDictionary()


def _check_args(model, images, branching, response, chunk, class_name):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:  # batch statistics and dropout would make the images (and the stacked copies) interact
        raise ValueError(f"model must be in eval mode (call model.eval()); {training[0]!r} is in training mode")
    check_images(images)
    check_int(branching, "branching", 1, MAX_BRANCHING)
    check_int(chunk, "chunk", 1, 10**9)
    if response not in RESPONSES:
        raise ValueError(f"response must be one of {', '.join(map(repr, RESPONSES))}, got {response!r}")
    if class_name is not None and (not isinstance(class_name, str) or not class_name):
        raise TypeError(f"class_name must be a non-empty string or None, got {class_name!r}")


def _top_unit(graph: ModelGraph) -> str:
    if graph.classifier is not None:
        return graph.classifier
    outs = graph.dag.outputs
    if len(outs) != 1:
        raise ValueError(f"model has no single output unit (found {list(outs)}); SSA needs the logits to come from "
                         "one linear or conv unit")
    return outs[0]


def _width(graph: ModelGraph, name: str) -> int:
    unit = graph.units[name]
    return getattr(unit, "out_channels", None) or unit.out_features


def _progress(total: int, progress: Optional[bool], desc: str):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc=desc, unit="layer", disable=not show, leave=False)


def ssa(model: nn.Module, images: torch.Tensor, target: int, branching: int = 3, response: str = "mean",
        chunk: int = 50, progress: Optional[bool] = False, graph: Optional[ModelGraph] = None,
        class_name: Optional[str] = None) -> DependencyGraph:
    """The dependency graph of the neurons relevant to output ``target`` on ``images``.

    Args:
        model (nn.Module): a CNN that :func:`nchains.analyze` accepts, in eval mode.
        images (Tensor[N, C, H, W]): finite, preprocessed; moved to the model's device and dtype.
        target (int): the output (class index) whose pre-softmax logit is the root.
        branching (int): ``b``, lower neurons kept per upper neuron (paper: 3).
        response (str): how an upper conv channel's map becomes one response: ``"mean"``
            (spatial mean, default) or ``"max"`` (see :mod:`nchains.ssa.step`).
        chunk (int): images per forward/VJP (bounds memory; the result does not depend on it).
        progress (bool | None): a tqdm bar over the layers (None: when stderr is a terminal).
        graph (ModelGraph): ``nchains.analyze(model, images[:1])``, reused when given.
        class_name (str): recorded in the result.

    Returns:
        DependencyGraph.

    Example:
        >>> g = nchains.ssa(model, images, target=7, branching=3)
        >>> g.nodes_per_layer()
        {'Conv1': 9, 'L1B1C1': 6, ..., 'FC': 1}
    """
    _check_args(model, images, branching, response, chunk, class_name)
    device, dtype = model_device_dtype(model)
    if graph is None:
        graph = analyze(model, images[:1].to(device=device, dtype=dtype))
    elif not isinstance(graph, ModelGraph):
        raise TypeError(f"graph must be a ModelGraph from nchains.analyze, got {type(graph).__name__}")
    else:
        graph.check_belongs(model, images.shape[1:], dtype)
    top = _top_unit(graph)
    check_int(target, "target", 0, _width(graph, top) - 1)
    dag = graph.dag
    chosen: Dict[str, Set[int]] = {top: {target}}
    edges, relevance = [], {}
    outputs = _UnitOutputs(graph, images, chunk, device, dtype)
    bar = _progress(len(dag.order), progress, "SSA" if class_name is None else f"SSA {class_name}")
    with bar:
        for upper in reversed(dag.order):
            bar.update(1)
            neurons, lowers = sorted(chosen.get(upper, ())), dag.producers(upper)
            if not neurons or not lowers:
                continue
            counts = _step_counts(graph, upper, lowers, outputs, neurons, response)
            for lower in lowers:
                picks = select_top(counts[lower].frequency, counts[lower].mean, branching)
                for n, row in zip(neurons, picks):
                    for k, f, r in row:
                        edges.append(((upper, n), (lower, k), f))
                        relevance[((upper, n), (lower, k))] = r
                        chosen.setdefault(lower, set()).add(k)
    rank = {n: i for i, n in enumerate(dag.order)}
    nodes, edges = canonical([(layer, k) for layer, ks in chosen.items() for k in ks], edges, rank)
    return DependencyGraph(nodes=nodes, edges=edges, relevance=relevance, target=target, classifier=top,
                           layers=list(dag.order), labels={n: graph.label_of[n] for n in dag.order},
                           images_hash=hash_tensor(images), num_images=len(images), branching=branching,
                           response=response, class_name=class_name)


def _cached(graph: ModelGraph, key, build):
    """Step and prefix graphs are built once per analysis (every class of a run reuses them)."""
    store = _GRAPHS.setdefault(graph, {})
    if key not in store:
        store[key] = build()
    return store[key]


class _UnitOutputs:
    """The producers' outputs per chunk of images: every unit's output computed once and kept
    when all of them fit in :data:`CACHE_BYTES`, else a forward up to the producers per step."""

    def __init__(self, graph: ModelGraph, images: torch.Tensor, chunk: int, device, dtype):
        self.graph = graph
        self.chunks = [(s, images[s:s + chunk].to(device=device, dtype=dtype)) for s in range(0, len(images), chunk)]
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_image = sum(math.prod(u.output_shape[1:]) for u in graph.units.values()) * itemsize
        self.kept = None
        if per_image * len(images) <= CACHE_BYTES:
            everything = _cached(graph, "prefix", lambda: prefix_graph(graph, graph.dag.order))
            with torch.no_grad():
                self.kept = [everything(x) for _, x in self.chunks]

    def __call__(self, lowers: Sequence[str]) -> Iterator[Tuple[int, torch.Tensor, Dict[str, torch.Tensor]]]:
        """(first image, images, {lower: output}) per chunk."""
        if self.kept is None:
            prefix = _cached(self.graph, ("prefix", tuple(lowers)), lambda: prefix_graph(self.graph, lowers))
        for j, (start, x) in enumerate(self.chunks):
            if self.kept is not None:
                yield start, x, {lo: self.kept[j][lo] for lo in lowers}
            else:
                with torch.no_grad():
                    yield start, x, prefix(x)


def _step_counts(graph: ModelGraph, upper: str, lowers: Sequence[str], outputs: _UnitOutputs, neurons: List[int],
                 response: str) -> Dict[str, OutlierCounts]:
    """STEPS 1-3 of one upper unit against all its producers, over every image chunk."""
    step = _cached(graph, ("step", upper), lambda: step_graph(graph, upper, lowers))
    counts = {lo: OutlierCounts(len(neurons), _width(graph, lo)) for lo in lowers}
    for start, x, values in outputs(lowers):
        for lo, omega in step_relevance(step, x, values, neurons, response).items():
            if not bool(torch.isfinite(omega).all()):
                raise ValueError(f"relevance of {graph.label_of[lo]} to {graph.label_of[upper]} is not finite on "
                                 f"images {start}..{start + len(x) - 1} (the model overflows on them)")
            counts[lo].add(omega)
    return counts
