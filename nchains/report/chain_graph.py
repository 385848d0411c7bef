"""The chain's architecture as data: layers as columns, kept filters as nodes, and edges between
kept filters weighted by the weights that connect them (drawn by :mod:`.chain_svg`).

Edges follow the unit DAG (``graph.dag``, :mod:`nchains.graph.dag`): unit ``A`` feeds unit
``B`` when a path leads from A's output to B's input through no other unit (activations, pools,
residual adds: a block's last conv and its shortcut feed the next block; concats). The weight of
the edge from filter ``a`` of A to filter ``b`` of B is ``sum_{kh, kw} |W_B[b, c]|``, the
absolute weights over B's kernel from its input channel ``c`` that carries ``a``: the same
channel through an add, shifted by the widths of the operands before it through a concat
(``c = offset + a``), within B's group for a grouped conv. The classifier is a last column of
the chain's classes, its edges ``sum |W[class, features of channel a]|`` (a flatten of a
``C x H x W`` map gives each channel ``H*W`` features). ``W_B`` is the conv's own weight (the one
it computes with: :meth:`~nchains.graph.units.ConvUnit.params`), BatchNorm not folded in.
Only computed filters have edges: filters of removed layers and blocks never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx

from nchains.report.unit_outputs import computed_layers

__all__ = ["ChainGraph", "Column", "Edge", "chain_graph", "input_sources"]


@dataclass
class Column:
    """One layer of the chain graph.

    Attributes:
        name (str): module path (or ``"classes"`` for the output column).
        label (str): the papers' label (``L2B1C1``).
        size (int): filters of the layer in the original model.
        kept (list[int]): computed kept filters (empty for a skipped layer), or the classes.
        scores (list[float]): their scores (empty for the output column).
        status (str): ``"kept"``, ``"removed"`` (no filter kept), ``"skipped"`` (inside a removed
            block: replaced by the identity) or ``"output"``.
        region (str or None): the gated region holding the layer.
    """

    name: str
    label: str
    size: int
    kept: List[int]
    scores: List[float]
    status: str
    region: Optional[str] = None


@dataclass(frozen=True)
class Edge:
    """``src`` filter of layer ``src_layer`` feeds ``dst`` of ``dst_layer`` with weight ``weight``."""

    src_layer: str
    src: int
    dst_layer: str
    dst: int
    weight: float


@dataclass
class ChainGraph:
    """Columns in graph order (the classes last), edges, and the regions with their status."""

    columns: List[Column]
    edges: List[Edge]
    blocks: List[Tuple[str, str, List[str], bool]] = field(default_factory=list)  # region, label, layers, kept

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


def input_sources(graph, node: fx.Node) -> List[Tuple[str, int]]:
    """``(unit, channel offset)`` of every unit whose output reaches ``node`` through no other
    unit (the DAG's rule), with the channel of ``node``'s value where the unit's channel 0 lands
    (shifted by earlier operands of a concat along dim 1)."""
    unit_of_last = {u.last: name for name, u in {**graph.layers, **graph.linears}.items()}
    concat_of = {c.node: c for c in graph.concats}
    memo: Dict[fx.Node, List[Tuple[str, int]]] = {}

    def walk(n: fx.Node) -> List[Tuple[str, int]]:
        if n in memo:
            return memo[n]
        memo[n] = []  # guards against cycles (there are none in a traced graph)
        if n in unit_of_last:
            found = [(unit_of_last[n], 0)]
        elif n in concat_of:
            c, found, offset = concat_of[n], [], 0
            for inp, width in zip(c.inputs, c.channels):
                found += [(u, o + offset) for u, o in walk(inp)]
                offset += width
        else:
            found = [s for inp in n.all_input_nodes if graph.node_kinds.get(inp) not in ("shape", "constant")
                     for s in walk(inp)]
        memo[n] = list(dict.fromkeys(found))
        return memo[n]

    return walk(node)


def _conv_matrix(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``M[out, in] = sum_kernel |W|`` over the conv's full input channels (zeros across groups)."""
    out_c, in_per = weight.shape[:2]
    w = weight.detach().abs().double().flatten(2).sum(2)
    m = torch.zeros(out_c, in_per * groups, dtype=torch.float64)
    per_out = out_c // groups
    for g in range(groups):
        m[g * per_out:(g + 1) * per_out, g * in_per:(g + 1) * in_per] = w[g * per_out:(g + 1) * per_out].cpu()
    return m


def _linear_matrix(weight: torch.Tensor, channels: int) -> Optional[torch.Tensor]:
    """``M[out, channel]``: |W| summed over each channel's features (None when they do not
    divide evenly: not a flatten of ``channels`` maps)."""
    w = weight.detach().abs().double().cpu()
    if channels <= 0 or w.shape[1] % channels:
        return None
    return w.reshape(w.shape[0], channels, -1).sum(2)


def _edges(graph, dst: str, matrix: torch.Tensor, dst_kept, kept: Dict[str, List[int]], sources) -> List[Edge]:
    out = []
    for src, offset in sources:
        if src not in kept or src not in graph.dag.producers(dst):
            continue
        for a in kept[src]:
            col = matrix[:, offset + a]
            out += [Edge(src, a, dst, b, float(col[b])) for b in dst_kept]
    return out


def chain_graph(chain, graph) -> ChainGraph:
    """The chain graph of ``chain`` on ``graph`` (``nchains.analyze(model)`` at the chain's
    input shape; checked against the chain).

    Returns:
        ChainGraph: a column per conv layer in graph order and one for the chain's classes;
        an edge per pair of computed kept filters (or class) that the DAG connects.
    """
    chain.check_graph(graph)
    computed = set(computed_layers(chain))
    region_of = {layer: r for r, info in chain.regions.items() for layer in info.get("layers", [])}
    columns, kept, edges = [], {}, []
    gm = graph.graph_module
    for name, unit in graph.layers.items():
        region = region_of.get(name)
        if name in computed:
            status, idx = "kept", list(chain.kept[name])
            scores = [float(s) for s in chain.scores[name]]
            kept[name] = idx
        else:
            status = "skipped" if region is not None and not chain.gates.get(region, 1) else "removed"
            idx, scores = [], []
        columns.append(Column(name, chain.label(name), unit.out_channels, idx, scores, status, region))
        if name in computed:
            matrix = _conv_matrix(unit.params(gm).weight, unit.groups)
            edges += _edges(graph, name, matrix, idx, kept, input_sources(graph, unit.input))
    if graph.classifier is not None:
        fc = graph.linears[graph.classifier]
        classes = sorted(int(c) for c in chain.classes)
        columns.append(Column("classes", "classes", fc.out_features, classes, [], "output"))
        sources = input_sources(graph, fc.input)
        width = max((o + graph.layers[u].out_channels for u, o in sources if u in graph.layers), default=0)
        matrix = _linear_matrix(gm.get_submodule(fc.first.target).weight, width)
        if matrix is not None:
            edges += _edges(graph, graph.classifier, matrix, classes, kept, sources)
            edges = [e if e.dst_layer != graph.classifier else Edge(e.src_layer, e.src, "classes", e.dst, e.weight)
                     for e in edges]
    blocks = [(r, chain.label(r), list(info.get("layers", [])), bool(chain.gates.get(r, 1)))
              for r, info in chain.regions.items() if info.get("kind") == "block"]
    return ChainGraph(columns, edges, blocks)
