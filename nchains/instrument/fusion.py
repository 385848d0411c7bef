"""Which residual adds the scoring phase folds into the conv before them.

In a residual block the last unit's output goes only into the add of the shortcut, whose sum
goes only into a ReLU (or nowhere else), which is often the output of a gated block:

    u = score * bn(conv(h));  out = relu(u + shortcut);  G * out + (1 - G) * block_input

:func:`nchains.ops.masked_conv2d` computes all of it in one call (``residual``,
``activation="relu"``, ``gate_logit`` and ``gate_input``), so the scoring loop runs one fused
op instead of four (conv, add, relu, gate) and their separate backward passes.
:func:`plan_fusions` finds those tails on a :class:`~nchains.analysis.ModelGraph`; the
:class:`~nchains.scoring.ScoredModel` uses them in its soft (scoring) graph only, the hard graph
keeps every unit's own output for hooks and Taylor contributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch.fx import Node

from nchains.graph.classify import _act_kind
from nchains.graph.units import ConvUnit


@dataclass(frozen=True)
class ResidualTail:
    """A unit's tail: ``add`` (of ``shortcut``), then a ReLU at ``act_node`` (None: no
    activation), gated by ``region`` (None: not gated) with its ``block_input``."""

    add: Node
    shortcut: Node
    act_node: Optional[Node]
    region: Optional[str]
    block_input: Optional[Node]

    @property
    def act(self) -> str:
        """The fused call's activation: ``"relu"`` or ``"none"``."""
        return "relu" if self.act_node is not None else "none"

    @property
    def output(self) -> Node:
        """The last node the fused call replaces."""
        return self.act_node if self.act_node is not None else self.add


def _sole_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def plan_fusions(graph, units: Dict[str, object], layer_gated: set) -> Dict[str, ResidualTail]:
    """Unit name -> its fusable residual tail.

    Args:
        graph (ModelGraph): the analysed model.
        units (dict name -> unit): the scored units (conv units are candidates).
        layer_gated (set of str): units whose own layer gate is fused already (not candidates).
    """
    gm = graph.graph_module
    adds = {a.node: a for a in graph.adds}
    gate_at = {r.output: r for r in graph.regions.values()}
    tails: Dict[str, ResidualTail] = {}
    claims: Dict[Node, str] = {}  # add -> the unit fused with it
    for name, u in units.items():
        if name in layer_gated or not isinstance(u, ConvUnit) or u.act is not None:
            continue
        add = _sole_user(u.last)
        if add not in adds or len(add.args) != 2 or add.kwargs:  # (an add with alpha= is not fused)
            continue
        a, b = adds[add].inputs
        if a is b:
            continue
        shortcut = b if a is u.last else a
        nxt = _sole_user(add)
        act_node = nxt if nxt is not None and _act_kind(gm, nxt) == "relu" else None
        out = act_node if act_node is not None else add
        region = gate_at.get(out)
        # Both operands may be units (a projection shortcut): the later one in graph order is
        # fused, so that the other is computed before the fused call needs it.
        claims[add] = name
        tails[name] = ResidualTail(
            add=add, shortcut=shortcut, act_node=act_node, region=region.name if region is not None else None,
            block_input=region.input if region is not None else None)
    return {name: t for name, t in tails.items() if claims[t.add] == name}
