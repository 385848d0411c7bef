"""The result of step-wise sensitivity analysis: a dependency graph of relevant neurons.

A node is ``(layer, index)``: a unit name of :func:`nchains.analyze` (``"layer4.0.conv2"``,
``"fc"``) and a channel (or feature) index; its label is the papers' (``L4B1C2_48``, ``FC_3``).
An edge ``(upper, lower, frequency)`` says that ``lower`` is among the ``branching`` most
frequent positive outliers of ``upper``'s relevance, in ``frequency`` of the images;
``relevance[(upper, lower)]`` is its mean relevance over all the images.

Files (:meth:`DependencyGraph.save`, by extension): ``.json`` (versioned, everything), ``.graphml``
(networkx; node ids ``layer:index``, graph attributes hold the metadata, so it loads back whole)
and ``.dot`` (graphviz, for pictures: one row per layer, nodes sized by frequency; write-only).
Writes are atomic; :meth:`DependencyGraph.load` validates every field and names the first bad one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from nchains._util.io import write_atomic
from nchains.graph.labels import filter_label

__all__ = ["FORMAT", "VERSION", "DependencyGraph", "Node"]

Node = Tuple[str, int]
FORMAT = "nchains-ssa-graph"
VERSION = 1
_META = ("target", "classifier", "images_hash", "num_images", "branching", "response", "class_name")


@dataclass
class DependencyGraph:
    """Relevant neurons of one target (class) and how they depend on each other.

    Attributes:
        nodes (list[(str, int)]): every node, sorted by layer (topological order) then index;
            the root ``(classifier, target)`` included.
        edges (list[((str, int), (str, int), int)]): ``(upper, lower, frequency)``, sorted by
            upper then lower node; frequency in [1, num_images].
        relevance (dict (upper, lower) -> float): mean relevance of every edge.
        target (int): the output analysed (a class index).
        classifier (str): the unit whose output ``target`` indexes.
        layers (list[str]): every unit of the model, topologically sorted.
        labels (dict str -> str): the papers' label of every unit in ``layers``.
        images_hash (str): SHA-256 of the images (:func:`nchains._util.io.hash_tensor`).
        num_images (int), branching (int), response (str): how it was computed.
        class_name (str | None): the target's name, when known.
    """

    nodes: List[Node]
    edges: List[Tuple[Node, Node, int]]
    relevance: Dict[Tuple[Node, Node], float]
    target: int
    classifier: str
    layers: List[str]
    labels: Dict[str, str]
    images_hash: str
    num_images: int
    branching: int
    response: str
    class_name: Optional[str] = None
    _rank: Dict[str, int] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._rank = {n: i for i, n in enumerate(self.layers)}

    @property
    def root(self) -> Node:
        return (self.classifier, self.target)

    def label(self, node: Node) -> str:
        """``('layer4.0.conv2', 48)`` -> ``'L4B1C2_48'``."""
        return filter_label(self.labels[node[0]], node[1])

    def node_frequency(self) -> Dict[Node, int]:
        """Per node, the largest frequency of an edge into it (``num_images`` for the root)."""
        out = {n: 0 for n in self.nodes}
        out[self.root] = self.num_images
        for _, lower, f in self.edges:
            out[lower] = max(out[lower], f)
        return out

    def nodes_per_layer(self) -> Dict[str, int]:
        """Layer label -> number of nodes, in layer order (layers without nodes left out)."""
        out: Dict[str, int] = {}
        for layer, _ in self.nodes:
            out[self.labels[layer]] = out.get(self.labels[layer], 0) + 1
        return out

    def to_networkx(self):
        """A ``networkx.DiGraph``: node ids ``"layer:index"`` with ``layer``, ``index``, ``label``,
        ``frequency``; edges upper -> lower with ``frequency`` and ``relevance``; the metadata
        as graph attributes (``layers`` and ``labels`` as JSON text, for GraphML)."""
        import networkx as nx

        g = nx.DiGraph()
        g.graph.update({k: getattr(self, k) for k in _META if getattr(self, k) is not None})
        g.graph.update(format=FORMAT, version=VERSION, layers=json.dumps(self.layers), labels=json.dumps(self.labels))
        freq = self.node_frequency()
        for n in self.nodes:
            g.add_node(_node_id(n), layer=n[0], index=n[1], label=self.label(n), frequency=freq[n])
        for upper, lower, f in self.edges:
            g.add_edge(_node_id(upper), _node_id(lower), frequency=f, relevance=self.relevance[(upper, lower)])
        return g

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (see :meth:`from_dict`)."""
        return {"format": FORMAT, "version": VERSION, **{k: getattr(self, k) for k in _META},
                "layers": list(self.layers), "labels": dict(self.labels), "nodes": [list(n) for n in self.nodes],
                "edges": [{"upper": list(u), "lower": list(lo), "frequency": f, "relevance": self.relevance[(u, lo)]}
                          for u, lo, f in self.edges]}

    @classmethod
    def from_dict(cls, data: Any) -> "DependencyGraph":
        """A graph from :meth:`to_dict`'s form, every field validated.

        Raises:
            ValueError/TypeError: naming the first bad field.
        """
        from nchains.ssa._schema import validated

        return cls(**validated(data))

    def to_dot(self) -> str:
        """Graphviz text: one row (``rank=same``, headed by a plaintext node ``row:<layer>``
        with the layer's label, chained by invisible edges) per layer, top layer first; node
        width and edge pen width by frequency."""
        freq = self.node_frequency()
        lines = ["digraph ssa {", "  rankdir=TB;", '  node [shape=ellipse, fontname="Helvetica", fontsize=10];']
        rows = [layer for layer in self.layers[::-1] if any(n[0] == layer for n in self.nodes)]
        for layer in rows:
            row = [n for n in self.nodes if n[0] == layer]
            # a plaintext anchor names the row; invisible edges between anchors keep one row per layer
            lines.append(f'  {{ rank=same; "row:{layer}" [shape=plaintext, label="{self.labels[layer]}"];')
            for n in row:
                width = 0.4 + 1.2 * freq[n] / max(1, self.num_images)
                lines.append(f'    "{_node_id(n)}" [label="{self.label(n)}", width={width:.3f}, '
                             f"frequency={freq[n]}];")
            lines.append("  }")
        for upper, lower in zip(rows, rows[1:]):
            lines.append(f'  "row:{upper}" -> "row:{lower}" [style=invis];')
        for u, lo, f in self.edges:
            pen = 0.5 + 2.5 * f / max(1, self.num_images)
            lines.append(f'  "{_node_id(u)}" -> "{_node_id(lo)}" [frequency={f}, penwidth={pen:.3f}];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path) -> None:
        """Writes the graph atomically as ``.json``, ``.graphml`` or ``.dot`` (by extension)."""
        kind = _kind(path, ("json", "graphml", "dot"))
        if kind == "json":
            text = json.dumps(self.to_dict(), indent=1)
        elif kind == "graphml":
            import networkx as nx

            text = "\n".join(nx.generate_graphml(self.to_networkx())) + "\n"
        else:
            text = self.to_dot()
        write_atomic(path, text)

    @classmethod
    def load(cls, path) -> "DependencyGraph":
        """Reads a ``.json`` or ``.graphml`` file written by :meth:`save` (validated)."""
        kind = _kind(path, ("json", "graphml"))
        if kind == "json":
            with open(path) as f:
                try:
                    data = json.load(f)
                except ValueError as exc:
                    raise ValueError(f"{os.fspath(path)!r} is not JSON: {exc}") from None
            return cls.from_dict(data)
        return cls.from_dict(_graphml_dict(path))


def _node_id(node: Node) -> str:
    return f"{node[0]}:{node[1]}"


def _kind(path, allowed) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in allowed:
        raise ValueError(f"path must end in {', '.join('.' + a for a in allowed)}, got {os.fspath(path)!r}")
    return ext


def _graphml_dict(path) -> Dict[str, Any]:
    """The :meth:`DependencyGraph.to_dict` form of a GraphML file written by ``save``."""
    import networkx as nx

    try:
        g = nx.read_graphml(path)
    except (nx.NetworkXError, SyntaxError, ValueError) as exc:  # xml ParseError is a SyntaxError
        raise ValueError(f"{os.fspath(path)!r} is not a GraphML file: {exc}") from None
    meta = dict(g.graph)
    try:
        layers, labels = json.loads(meta.pop("layers")), json.loads(meta.pop("labels"))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{os.fspath(path)!r}: graph attributes layers and labels (JSON text) are missing or "
                         "malformed; not written by DependencyGraph.save") from None
    pos: Dict[str, Tuple[str, int]] = {}
    for nid, attrs in g.nodes(data=True):
        pos[nid] = (attrs.get("layer"), attrs.get("index"))
    edges = [{"upper": list(pos[u]), "lower": list(pos[v]), "frequency": a.get("frequency"),
              "relevance": a.get("relevance")} for u, v, a in g.edges(data=True)]
    meta.setdefault("class_name", None)
    return {**meta, "layers": layers, "labels": labels, "nodes": [list(p) for p in pos.values()], "edges": edges}
