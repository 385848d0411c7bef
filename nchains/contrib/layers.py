"""The ``layers`` argument of :func:`nchains.contributions`: which sites are explained.

``"activations"``: every call of an activation (the papers' neurons a = ReLU(z), a residual
block's output after its add + ReLU included); ``"units"``: every conv(+BN)(+act) unit output;
a list of module paths: every call of each module is its own site (a leaf module's call is its
output; a container's call, e.g. a ResNet block, is the value it returns). Sites are keyed per
call (``layer1.0.relu@1``), never per module.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

from torch import fx

from nchains.graph.analysis import ModelGraph
from nchains.instrument.taps import Site, sites

__all__ = ["resolve_sites"]

Node = fx.Node


def _call_outputs(graph: ModelGraph, path: str) -> Dict[str, Node]:
    """Per call of module ``path`` (its ``nn_module_stack`` key), the node whose value the call returns."""
    inside: Dict[str, List[Node]] = {}
    for node in graph.graph_module.graph.nodes:
        for key, (module, _) in node.meta.get("nn_module_stack", {}).items():
            if module == path:
                inside.setdefault(key, []).append(node)
    out = {}
    for key, nodes in inside.items():
        members = set(nodes)
        leaving = [n for n in nodes if any(u not in members for u in n.users)]
        if len(leaving) != 1:
            raise ValueError(f"layers: module {path!r} (call {key!r}) returns {len(leaving)} values; a site must "
                             "be one tensor (name a module inside it)")
        out[key] = leaving[0]
    return out


def _site_of(graph: ModelGraph, key: str, path: str, node: Node, known: Dict[Node, Site]) -> Site:
    """The site of one call of ``path`` keyed by the call (``layer3.0``, ``layer1.0.relu@1``);
    the label of an activation or unit site at the same node when there is one."""
    call = key.partition("@")[2]
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ValueError(f"layers: module {path!r} does not return a tensor; a site must be one tensor")
    label = known[node].label if node in known else graph.label_of.get(key) or graph.label_of.get(path) or key
    return Site(key, path, int(call) if call else 0, label, tuple(meta.shape), node)


def _valid_names(graph: ModelGraph) -> List[str]:
    return sorted({m for n in graph.graph_module.graph.nodes for m, _ in n.meta.get("nn_module_stack", {}).values()})


def resolve_sites(graph: ModelGraph, layers: Union[str, Sequence[str]]) -> List[Site]:
    """The sites ``layers`` names, in execution order, keys unique.

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        layers: ``"activations"``, ``"units"``, or a non-empty list of module paths (or of
            activation site keys, such as a function call's ``relu_1``).

    Returns:
        list[Site] (:class:`nchains.instrument.taps.Site`).

    Raises:
        TypeError: ``layers`` is neither a string nor a list of strings.
        ValueError: an unknown name (the message lists a few valid ones), or an empty list.
    """
    if isinstance(layers, str):
        if layers not in ("activations", "units"):
            raise ValueError(f"layers must be 'activations', 'units' or a list of module paths, got {layers!r}")
        return sites(graph, layers)
    if not isinstance(layers, Sequence) or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"layers must be 'activations', 'units' or a list of module paths (str), got {layers!r}")
    if not layers:
        raise ValueError("layers must name at least one module path, got an empty list")
    acts = sites(graph, "activations")
    known = {s.node: s for s in [*sites(graph, "units"), *acts]}
    by_key = {s.key: s for s in acts}
    order = {n: i for i, n in enumerate(graph.graph_module.graph.nodes)}
    chosen: Dict[Node, Site] = {}  # a node named twice (a block and its last ReLU) is one site
    for path in layers:
        calls = _call_outputs(graph, path)
        if not calls and path in by_key:
            calls = {path: by_key[path].node}
        if not calls:
            valid = _valid_names(graph)
            close = [v for v in valid if path.split(".")[0] in v][:5] or valid[:5]
            raise ValueError(f"layers: {path!r} is not a module of the model; valid module paths include "
                             f"{', '.join(close)} ({len(valid)} in all)")
        for key, node in calls.items():
            chosen.setdefault(node, _site_of(graph, key, path, node, known))
    return sorted(chosen.values(), key=lambda s: order[s.node])
