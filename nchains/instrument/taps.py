"""Per-call taps: a copy of the traced model that also returns the activations of chosen sites.

A *site* is one call of an activation (or one conv unit's output) in one forward. Sites are
keyed per call, never per module: torchvision's BasicBlock calls its one ``nn.ReLU`` twice
(after ``bn1``, and after the residual add), so it has two sites, ``layer1.0.relu`` and
``layer1.0.relu@1``, with different values. Forward hooks are per module and cannot tell the
calls apart (Captum's bug, pytorch/captum#1082, #1104); a tap is a rewrite of the traced graph
instead, so each call is its own fx node and its own output.

Example:
    >>> graph = nchains.analyze(model, images[:1])
    >>> acts = sites(graph)                      # every activation call, execution order
    >>> tapped = tap(graph, acts)
    >>> logits, values = tapped(images)          # values["layer1.0.relu@1"]: Tensor[N, C, H, W]
    >>> grads = torch.autograd.grad(logits[:, 3].sum(), list(values.values()))
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import fx

from nchains._util.paths import fetch
from nchains.graph.analysis import ModelGraph
from nchains.graph.labels import make_labels
from nchains.instrument.rewrite_parts import _out_of_place

__all__ = ["Site", "sites", "tap"]

Node = fx.Node


@dataclass(frozen=True)
class Site:
    """One call of an activation (or one unit output) in a forward.

    Attributes:
        key (str): unique name: the module path with ``@<call>`` for calls after the first
            (``layer1.0.relu``, ``layer1.0.relu@1``), as in :class:`~nchains.graph.ModelGraph`;
            the fx node name for a function call (``relu_1`` for a ``torch.relu`` in a forward).
        module (str): dotted module path, or the fx node name of a function or method call.
        call (int): 0-based index of this call of ``module`` within one forward.
        label (str): the papers' label: the unit's (``L1B1C1``) when the site is a unit's
            output, the block's (``L1B1``) when it is a block's output, else ``key``.
        shape (tuple[int, ...]): the activation's shape on the analysis' example input.
        node (fx.Node): the node of ``graph.graph_module`` whose value the site is.
    """

    key: str
    module: str
    call: int
    label: str
    shape: Tuple[int, ...]
    node: Node = field(repr=False, compare=False)


def _module_and_call(node: Node) -> Tuple[str, str, int]:
    """(key, module, call) of a node: module calls from their ``nn_module_stack`` key."""
    if node.op != "call_module":
        return node.name, node.name, 0
    key = next(reversed(node.meta["nn_module_stack"]))
    call = key.partition("@")[2]
    return key, node.target, int(call) if call else 0


def _block_label(graph: ModelGraph, node: Node) -> Optional[str]:
    """The label of the module whose output ``node`` is (a ResNet block's ``L1B1``), or None
    when ``node`` is used inside that module or the module has no paper label."""
    stack = list(node.meta.get("nn_module_stack", {}))
    parents = stack[:-1] if node.op == "call_module" else stack
    if not parents:
        return None
    parent = parents[-1]
    if any(parent in u.meta.get("nn_module_stack", {}) for u in node.users):
        return None
    label = graph.label_of.get(parent) or make_labels(graph.graph_module, [(parent, "block")])[parent]
    return None if label == parent else label


def _activation_sites(graph: ModelGraph) -> List[Site]:
    unit_of = {u.last: u for u in [*graph.layers.values(), *graph.linears.values()]}
    out, taken = [], set()
    for node in graph.graph_module.graph.nodes:
        if graph.node_kinds.get(node) != "act":
            continue
        key, module, call = _module_and_call(node)
        while key in taken:  # a function node named like a module path: keep keys unique
            key += "'"
        taken.add(key)
        unit = unit_of.get(node)
        label = unit.label if unit is not None else (_block_label(graph, node) or key)
        out.append(Site(key, module, call, label, tuple(node.meta["tensor_meta"].shape), node))
    return out


def _unit_sites(graph: ModelGraph) -> List[Site]:
    out = []
    for name, unit in graph.layers.items():
        call = name.partition("@")[2]
        out.append(Site(name, unit.conv, int(call) if call else 0, unit.label, tuple(unit.output_shape),
                        unit.last))
    return out


def sites(graph: ModelGraph, layers: str = "activations") -> List[Site]:
    """The sites of ``graph`` in execution order.

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        layers (str): ``"activations"``: every call of an activation module or function
            (ReLU, ReLU6, SiLU, GELU; the papers' neurons ``a = ReLU(z)``, a residual block's
            output after its add + ReLU included); ``"units"``: every conv(+BN)(+act) unit
            output (``graph.layers``, keyed like them).

    Returns:
        list[Site], keys unique.
    """
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"graph must be a ModelGraph from nchains.analyze, got {type(graph).__name__}")
    if layers == "activations":
        return _activation_sites(graph)
    if layers == "units":
        return _unit_sites(graph)
    raise ValueError(f"layers must be 'activations' or 'units', got {layers!r}")


def _check_sites(graph: ModelGraph, chosen) -> List[Site]:
    chosen = list(chosen)
    nodes = set(graph.graph_module.graph.nodes)
    keys = set()
    for s in chosen:
        if not isinstance(s, Site):
            raise TypeError(f"sites must be Site objects (from nchains.instrument.taps.sites), got "
                            f"{type(s).__name__}")
        if s.node not in nodes:
            raise ValueError(f"site {s.key!r} is not a site of this graph (built from another analysis)")
        if s.key in keys:
            raise ValueError(f"sites must have unique keys, got {s.key!r} twice")
        keys.add(s.key)
    return chosen


def tap(graph: ModelGraph, chosen: Sequence[Site]) -> fx.GraphModule:
    """A copy of the traced model whose forward returns ``(output, {site key: activation})``.

    The copy shares the model's weights (no hooks, nothing of the model is modified). Its
    in-place ops are made out-of-place, so a returned activation is the value the site had,
    never overwritten later in the forward, and it is the very tensor the rest of the forward
    consumes: ``torch.autograd.grad(output, activation)`` is the gradient at the site.

    Args:
        graph (ModelGraph): from :func:`nchains.analyze`.
        chosen (sequence of Site): sites of ``graph`` (:func:`sites`), any order.

    Returns:
        fx.GraphModule mapping Tensor[N, *input_shape] to ``(output, dict key -> Tensor)``,
        the dict in the order of ``chosen``; each tensor has its site's shape with batch N.
    """
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"graph must be a ModelGraph from nchains.analyze, got {type(graph).__name__}")
    chosen = _check_sites(graph, chosen)
    gm = graph.graph_module
    new, env = fx.Graph(), {}
    returned = new.output(new.graph_copy(gm.graph, env))
    owned = _functionalize(new, gm)  # the model's output sees its mutations, a site's value never
    output = returned.args[0]
    new.erase_node(returned)
    new.output((output, {s.key: env[s.node] for s in chosen}))
    # a dict root gives the copy fresh parent modules: nothing is set on the model's own modules
    return fx.GraphModule(owned, new, class_name=f"Tapped{type(gm).__name__}")


def _functionalize(graph: fx.Graph, gm: fx.GraphModule) -> Dict[str, object]:
    """Make every in-place op of ``graph`` out-of-place, in place of the graph.

    An in-place op's result may be dropped (``y.add_(b)``, then ``y`` used), so the later users
    of the tensor it mutated are redirected to its result. Returns the objects the graph's
    ``call_module``/``get_attr`` targets name: the model's own, except private out-of-place
    copies of in-place modules (``nn.ReLU(inplace=True)``)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    owned: Dict[str, object] = {}
    for node in list(graph.nodes):
        mutated = False
        if node.op in ("call_function", "call_method"):
            before = (node.target, node.args, node.kwargs)
            _out_of_place(node)
            mutated = before != (node.target, node.args, node.kwargs)
        elif node.op in ("call_module", "get_attr"):
            value = owned.get(node.target, fetch(gm, node.target))
            if getattr(value, "inplace", False) is True:
                value = copy.deepcopy(value)
                value.inplace = False
            mutated = node.op == "call_module" and value is not fetch(gm, node.target)
            owned[node.target] = value
        target = node.args[0] if node.args else None
        if mutated and isinstance(target, Node):
            for user in [u for u in target.users if order[u] > order[node]]:
                user.replace_input_with(target, node)
    return owned

