"""Model-centric SSA results: dependency graphs of several classes compared and clustered.

Each class's graph becomes a bag-of-nodes vector over the union of all graphs' nodes (the
roots ``(classifier, target)`` left out: they differ by construction and would add the same
distance between every pair). ``weighting="frequency"``: a node's weight is its
:meth:`~nchains.ssa.DependencyGraph.node_frequency` divided by the graph's number of images (in
(0, 1]; 0 when absent), so classes analysed on different numbers of images compare;
``"binary"``: 1 when the node is present. Rows are clustered by Ward's method
(:func:`scipy.cluster.hierarchy.linkage` on the vectors, Euclidean).
"""

from __future__ import annotations

import io
from typing import Any, Dict, Hashable, List, Mapping, Tuple

import numpy as np

from nchains._util.io import write_atomic
from nchains.ssa.dependency_graph import DependencyGraph, Node

__all__ = ["SSAClusters", "WEIGHTINGS", "ssa_clusters"]

WEIGHTINGS = ("frequency", "binary")


class SSAClusters:
    """Result of :func:`ssa_clusters`.

    Attributes:
        labels (list): the classes (the keys of the graphs' dict), one per row.
        nodes (list[(str, int)]): the columns: every non-root node of any graph, by layer
            (topological) then index.
        vectors (np.ndarray[C, D]): bag-of-nodes vectors.
        linkage (np.ndarray[C - 1, 4]): Ward linkage (scipy's format).
        graphs (dict): the graphs, by class.
        weighting (str).
    """

    def __init__(self, graphs: Dict[Hashable, DependencyGraph], weighting: str):
        from scipy.cluster.hierarchy import linkage

        self.graphs, self.weighting = graphs, weighting
        self.labels = list(graphs)
        first = next(iter(graphs.values()))
        rank = {n: i for i, n in enumerate(first.layers)}
        nodes = {n for g in graphs.values() for n in g.nodes if n != g.root}
        self.nodes: List[Node] = sorted(nodes, key=lambda n: (rank[n[0]], n[1]))
        col = {n: j for j, n in enumerate(self.nodes)}
        self.vectors = np.zeros((len(graphs), len(self.nodes)))
        for i, g in enumerate(graphs.values()):
            for n, f in g.node_frequency().items():
                if n != g.root:
                    self.vectors[i, col[n]] = 1.0 if weighting == "binary" else f / g.num_images
        self.linkage = linkage(self.vectors, method="ward")

    def shared(self, a: Hashable, b: Hashable):
        """The sub-graph classes ``a`` and ``b`` share: the nodes in both graphs and the edges
        (same upper and lower node) in both, as a ``networkx.DiGraph`` with node ids
        ``layer:index`` (attributes ``layer``, ``index``, ``label``) and edge attributes
        ``frequency`` = (frequency in a, frequency in b)."""
        import networkx as nx

        ga, gb = self._graph(a, "a"), self._graph(b, "b")
        out = nx.DiGraph(classes=(str(a), str(b)))
        for n in sorted(set(ga.nodes) & set(gb.nodes), key=ga.nodes.index):
            out.add_node(f"{n[0]}:{n[1]}", layer=n[0], index=n[1], label=ga.label(n))
        fb = {(u, lo): f for u, lo, f in gb.edges}
        for u, lo, f in ga.edges:
            if (u, lo) in fb:
                out.add_edge(f"{u[0]}:{u[1]}", f"{lo[0]}:{lo[1]}", frequency=(f, fb[(u, lo)]))
        return out

    def _graph(self, key: Hashable, arg: str) -> DependencyGraph:
        if key not in self.graphs:
            raise ValueError(f"{arg} must be one of the classes {self.labels}, got {key!r}")
        return self.graphs[key]

    def summary(self) -> Dict[str, Any]:
        """JSON-ready: per pair of classes the shared nodes and edges (counts and labels)."""
        pairs = []
        for i, a in enumerate(self.labels):
            for b in self.labels[i + 1:]:
                s = self.shared(a, b)
                pairs.append({"classes": [str(a), str(b)], "nodes": s.number_of_nodes(), "edges": s.number_of_edges(),
                              "shared_nodes": [d["label"] for _, d in s.nodes(data=True)]})
        return {"weighting": self.weighting, "labels": [str(c) for c in self.labels],
                "linkage": self.linkage.tolist(), "shared": pairs}

    def plot(self, path) -> None:
        """A PNG: the dendrogram (left) beside the bag-of-nodes matrix, rows in dendrogram
        order, columns grouped by layer (a clustermap). Written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from scipy.cluster.hierarchy import dendrogram

        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(self.labels)),
                                          gridspec_kw={"width_ratios": [1, 4]})
        tree = dendrogram(self.linkage, labels=[str(c) for c in self.labels], orientation="left", ax=left,
                          color_threshold=0)
        left.set_title("Ward clustering")
        order = tree["leaves"][::-1]  # dendrogram draws its first leaf at the bottom
        right.imshow(self.vectors[order], aspect="auto", cmap="viridis", interpolation="nearest",
                     vmin=0, vmax=max(1e-12, float(self.vectors.max(initial=0))))
        right.set_yticks(range(len(order)), [str(self.labels[i]) for i in order])
        firsts = _layer_starts(self.nodes, next(iter(self.graphs.values())))
        right.set_xticks([j for j, _ in firsts], [lab for _, lab in firsts], rotation=90, fontsize=7)
        right.set_title(f"nodes ({self.weighting})")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        write_atomic(path, buf.getvalue())


def _layer_starts(nodes: List[Node], graph: DependencyGraph) -> List[Tuple[int, str]]:
    out, last = [], None
    for j, (layer, _) in enumerate(nodes):
        if layer != last:
            out.append((j, graph.labels[layer]))
            last = layer
    return out


def ssa_clusters(graphs: Mapping[Hashable, DependencyGraph], weighting: str = "frequency") -> SSAClusters:
    """Ward clustering of classes by the nodes of their dependency graphs.

    Args:
        graphs (dict class -> DependencyGraph): at least two, of one model (same layers).
        weighting (str): ``"frequency"`` or ``"binary"`` (see the module docstring).

    Returns:
        SSAClusters.
    """
    if not isinstance(graphs, Mapping):
        raise TypeError(f"graphs must be a dict class -> DependencyGraph, got {type(graphs).__name__}")
    if len(graphs) < 2:
        raise ValueError(f"graphs must hold at least two classes to cluster, got {len(graphs)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(map(repr, WEIGHTINGS))}, got {weighting!r}")
    first = None
    for key, g in graphs.items():
        if not isinstance(g, DependencyGraph):
            raise TypeError(f"graphs[{key!r}] must be a DependencyGraph, got {type(g).__name__}")
        if first is None:
            first = (key, g)
        elif g.layers != first[1].layers or g.labels != first[1].labels:
            raise ValueError(f"graphs[{key!r}] is of another model than graphs[{first[0]!r}] (different layers)")
    return SSAClusters(dict(graphs), weighting)
