"""Gateable regions of a traced CNN: innermost one-in one-out module calls (blocks) and
same-shape single units (layers), never nested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

from torch import fx, nn

from nchains.graph.classify import is_tensor, shape_of
from nchains.graph.units import ConvUnit

Node = fx.Node


@dataclass(eq=False)
class Region:
    """A gateable region: ``out = G * f(x) + (1 - G) * x`` with ``x = input``, ``f(x) = output``.

    ``kind`` is ``"block"`` (a module call, e.g. a ResNet block) or ``"layer"`` (one unit).
    """

    name: str
    label: str
    kind: str
    input: Node
    output: Node
    units: Tuple[str, ...]
    shape: Tuple[int, ...]
    nodes: Tuple[Node, ...]


@dataclass(eq=False)
class _Call:
    key: str
    path: str
    nodes: FrozenSet[Node]
    input: Optional[Node] = None
    output: Optional[Node] = None
    units: Tuple[str, ...] = ()


def _module_calls(gm: fx.GraphModule, leaf_nodes: set) -> List[_Call]:
    """Non-leaf, non-container module calls (candidates for block regions)."""
    members: Dict[str, Tuple[str, List[Node]]] = {}
    for node in gm.graph.nodes:
        for key, (path, _) in node.meta.get("nn_module_stack", {}).items():
            members.setdefault(key, (path, []))[1].append(node)
    calls = []
    for key, (path, nodes) in members.items():
        module = gm.get_submodule(path)
        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        if len(nodes) == 1 and nodes[0] in leaf_nodes:
            continue
        calls.append(_Call(key, path, frozenset(nodes)))
    return calls


def _bind_region(call: _Call, layers: Dict[str, ConvUnit]) -> bool:
    """Fill ``call.input/output/units``; True when it is a one-in one-out same-shape call
    that contains at least one whole unit and cuts no unit."""
    inputs = {a for n in call.nodes for a in n.all_input_nodes
              if a not in call.nodes and a.op != "get_attr"}
    outputs = [n for n in call.nodes if any(u not in call.nodes for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    (inp,), (out,) = inputs, outputs
    if not (is_tensor(inp) and is_tensor(out)):
        return False
    a, b = inp.meta["tensor_meta"], out.meta["tensor_meta"]
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    units = []
    for name, unit in layers.items():
        inside = sum(n in call.nodes for n in unit.nodes)
        if inside and inside != len(unit.nodes):
            return False
        if inside:
            units.append(name)
    call.input, call.output, call.units = inp, out, tuple(units)
    return bool(units)


def _innermost(cands: List[_Call]) -> List[_Call]:
    def inside(o: _Call, c: _Call) -> bool:
        deeper = o.key.count(".") > c.key.count(".")
        return o.nodes <= c.nodes and (len(o.nodes) < len(c.nodes) or deeper)
    return [c for c in cands if not any(o is not c and inside(o, c) for o in cands)]


def _regions(gm: fx.GraphModule, layers: Dict[str, ConvUnit], kinds: Dict[Node, str],
             order: Dict[Node, int]) -> Dict[str, Region]:
    leaf_nodes = {n for n in gm.graph.nodes if n.op == "call_module"}
    calls = _module_calls(gm, leaf_nodes)
    blocks = _innermost([c for c in calls if _bind_region(c, layers)])
    # Units inside a residual module (e.g. a downsampling ResNet block) are gated with
    # their block when it is gateable and never as single layers, as in the paper.
    residual = [c for c in calls if any(kinds.get(n) == "add" for n in c.nodes)]
    regions = []
    for c in blocks:
        nodes = tuple(sorted(c.nodes, key=order.__getitem__))
        regions.append(Region(c.key, "", "block", c.input, c.output, c.units,
                              shape_of(c.output), nodes))
        for u in c.units:
            layers[u].region = c.key
    for name, u in layers.items():
        if (u.region is None and u.input_shape == u.output_shape
                and u.input.meta["tensor_meta"].dtype == u.last.meta["tensor_meta"].dtype
                and not any(u.first in c.nodes for c in residual)):
            u.region = name
            regions.append(Region(name, "", "layer", u.input, u.last, (name,),
                                  u.output_shape, u.nodes))
    regions.sort(key=lambda r: order[r.output])
    return {r.name: r for r in regions}
