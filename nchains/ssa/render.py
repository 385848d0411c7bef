"""Pictures of dependency graphs: one row per layer (the classifier on top), nodes sized by
frequency. Graphviz's ``dot`` lays the graph out when it is on PATH (``engine="auto"``);
otherwise matplotlib draws the rows itself (nodes evenly spaced in index order, edges as
straight lines whose width follows their frequency). Both write SVG, atomically.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess

from nchains._util.io import write_atomic
from nchains.ssa.dependency_graph import DependencyGraph

__all__ = ["ENGINES", "render"]

ENGINES = ("auto", "dot", "matplotlib")
_DOT_TIMEOUT_S = 120


def render(graph: DependencyGraph, path, engine: str = "auto") -> str:
    """Draws ``graph`` as an SVG file at ``path``.

    Args:
        graph (DependencyGraph): what to draw.
        path (path): the ``.svg`` file to write.
        engine (str): ``"dot"`` (graphviz; ValueError when it is not installed),
            ``"matplotlib"``, or ``"auto"`` (dot when on PATH, else matplotlib).

    Returns:
        str: the engine used.
    """
    if not isinstance(graph, DependencyGraph):
        raise TypeError(f"graph must be a DependencyGraph, got {type(graph).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if not os.fspath(path).lower().endswith(".svg"):
        raise ValueError(f"path must end in .svg, got {os.fspath(path)!r}")
    dot = shutil.which("dot")
    if engine == "dot" and dot is None:
        raise ValueError("engine 'dot' needs graphviz's dot on PATH (apt install graphviz), or use 'matplotlib'")
    if engine == "matplotlib" or dot is None:
        write_atomic(path, _matplotlib_svg(graph))
        return "matplotlib"
    run = subprocess.run([dot, "-Tsvg"], input=graph.to_dot().encode(), capture_output=True,
                         timeout=_DOT_TIMEOUT_S)
    if run.returncode != 0:
        raise OSError(f"dot -Tsvg failed: {run.stderr.decode(errors='replace').strip()[:300]}")
    write_atomic(path, run.stdout)
    return "dot"


def _matplotlib_svg(graph: DependencyGraph) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = [layer for layer in graph.layers if any(n[0] == layer for n in graph.nodes)]
    row = {layer: i for i, layer in enumerate(layers)}  # first conv at the bottom
    xy = {}
    for layer in layers:
        members = [n for n in graph.nodes if n[0] == layer]
        for j, n in enumerate(members):
            xy[n] = ((j + 1) / (len(members) + 1), row[layer])
    freq = graph.node_frequency()
    widest = max(len([n for n in graph.nodes if n[0] == layer]) for layer in layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * widest), max(3.0, 0.8 * len(layers))))
    for u, lo, f in graph.edges:
        (x0, y0), (x1, y1) = xy[u], xy[lo]
        ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=0.4 + 2.5 * f / graph.num_images, zorder=1)
    for n, (x, y) in xy.items():
        ax.scatter([x], [y], s=60 + 600 * freq[n] / graph.num_images, color="#4c72b0", zorder=2)
        ax.annotate(graph.label(n), (x, y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=7)
    ax.set_yticks(range(len(layers)), [graph.labels[layer] for layer in layers], fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(layers) - 0.4)
    title = graph.class_name if graph.class_name is not None else f"target {graph.target}"
    ax.set_title(f"SSA dependency graph: {title} ({graph.num_images} images, b={graph.branching})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()
