"""The chain graph (:mod:`.chain_graph`) as one inline SVG element.

Layers are columns in graph order; a kept filter is a circle coloured by its score (the papers'
colouring: red high, blue low; a colour bar gives the scale); a layer without kept filters is a
dashed "removed" box, a layer inside a removed block a grey "skipped" box, and a removed block
is a grey band over its columns labelled "removed (identity)". Edges are curves whose width
and opacity grow with their weight relative to the largest edge into the same layer; by
default only each node's ``edges_per_filter`` strongest incoming edges are drawn (hundreds of
filters would otherwise give tens of thousands of curves). Every node, edge and box has a
``<title>`` (hover text): filter label and score, or both ends and the weight.
"""

from __future__ import annotations

from html import escape
from typing import Dict, List, Optional, Tuple

from nchains.report.chain_graph import ChainGraph, Edge

__all__ = ["chain_svg", "drawn_edges"]

COL_W, TOP, ROW_H, MAX_H = 66, 70, 13, 560
NODE_R = 4.6
SKIP_FILL = "#d9d9d9"


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(255 * min(max(v, 0.0), 1.0))):02x}" for v in rgb[:3])


def _colour(t: float) -> str:
    from matplotlib import colormaps

    return _hex(colormaps["jet"](min(max(t, 0.0), 1.0)))


def drawn_edges(cg: ChainGraph, edges_per_filter: Optional[int] = 3) -> List[Edge]:
    """The edges drawn: for each destination node its ``edges_per_filter`` heaviest incoming
    edges (all when None), heaviest first; zero-weight edges are never drawn."""
    into: Dict[Tuple[str, int], List[Edge]] = {}
    for e in cg.edges:
        if e.weight > 0:
            into.setdefault((e.dst_layer, e.dst), []).append(e)
    out = []
    for group in into.values():
        group.sort(key=lambda e: (-e.weight, e.src_layer, e.src))
        out += group if edges_per_filter is None else group[:edges_per_filter]
    return out


def _positions(cg: ChainGraph) -> Tuple[Dict[Tuple[str, int], Tuple[float, float, float]], Dict[str, float], float]:
    """Node centre and radius per (layer, filter), column x, and the drawing's height."""
    pos, xs, height = {}, {}, TOP + 3 * ROW_H
    for i, col in enumerate(cg.columns):
        x = 40 + i * COL_W + COL_W / 2
        xs[col.name] = x
        n = len(col.kept)
        step = min(ROW_H, (MAX_H - TOP) / max(n, 1))
        r = min(NODE_R, 0.42 * step)
        for j, f in enumerate(col.kept):
            pos[(col.name, f)] = (x, TOP + 8 + j * step, r)
        height = max(height, TOP + 16 + n * step)
    return pos, xs, height


def _label(col, f: int) -> str:
    return f"class {f}" if col.status == "output" else f"{col.label}_{f}"


def chain_svg(cg: ChainGraph, *, edges_per_filter: Optional[int] = 3, class_names=None, title: str = "") -> str:
    """The ``<svg>`` element (a string) drawing ``cg``.

    Args:
        cg (ChainGraph): from :func:`~nchains.report.chain_graph.chain_graph`.
        edges_per_filter (int or None): strongest incoming edges drawn per node (None: all).
        class_names (list[str] or None): names for the output column's classes.
        title (str): the drawing's accessible title.
    """
    if edges_per_filter is not None and (isinstance(edges_per_filter, bool) or not isinstance(edges_per_filter, int)
                                         or edges_per_filter < 1):
        raise ValueError(f"edges_per_filter must be an int >= 1 or None, got {edges_per_filter!r}")
    pos, xs, height = _positions(cg)
    width = 40 + len(cg.columns) * COL_W + 150
    scores = [s for c in cg.columns for s in c.scores]
    lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    cols = {c.name: c for c in cg.columns}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chain-graph" viewBox="0 0 {width} {height:.0f}" '
             f'width="{width}" height="{height:.0f}" role="img" font-family="sans-serif" font-size="10">',
             f"<title>{escape(title or 'chain graph')}</title>",
             '<defs><linearGradient id="score-bar" x1="0" y1="1" x2="0" y2="0">'
             + "".join(f'<stop offset="{t:.2f}" stop-color="{_colour(t)}"/>' for t in (0, .25, .5, .75, 1))
             + "</linearGradient></defs>"]
    parts += _blocks(cg, xs, height)
    parts += _columns(cg, xs, height)
    parts += _edge_paths(cg, drawn_edges(cg, edges_per_filter), pos, cols, class_names)
    for col in cg.columns:
        for j, f in enumerate(col.kept):
            x, y, r = pos[(col.name, f)]
            if col.status == "output":
                name = class_names[f] if class_names and f < len(class_names) else str(f)
                parts.append(f'<g class="class-node"><rect x="{x - 5}" y="{y - 5}" width="10" height="10" fill="#444">'
                             f"<title>class {f}: {escape(name)}</title></rect>"
                             f'<text x="{x + 8}" y="{y + 3.5}">{escape(name)}</text></g>')
                continue
            s = col.scores[j]
            parts.append(f'<circle class="filter" cx="{x:.1f}" cy="{y:.1f}" r="{r:.2f}" fill="{_colour((s - lo) / span)}" '
                         f'stroke="#222" stroke-width="0.4"><title>{escape(_label(col, f))}  score {s:.3f}</title></circle>')
    parts += _colour_bar(width - 120, lo, hi)
    parts.append("</svg>")
    return "\n".join(parts)


def _blocks(cg: ChainGraph, xs: Dict[str, float], height: float) -> List[str]:
    out = []
    for region, label, layers, kept in cg.blocks:
        inside = [xs[l] for l in layers if l in xs]
        if kept or not inside:
            continue
        x0, x1 = min(inside) - COL_W / 2 + 3, max(inside) + COL_W / 2 - 3
        out.append(f'<g class="removed-block"><rect x="{x0:.1f}" y="{TOP - 22}" width="{x1 - x0:.1f}" '
                   f'height="{height - TOP + 14:.0f}" fill="#eeeeee" stroke="#999" stroke-dasharray="4 3">'
                   f"<title>{escape(label)} ({escape(region)}) removed: replaced by the identity</title></rect>"
                   f'<text x="{(x0 + x1) / 2:.1f}" y="{TOP - 10}" text-anchor="middle" fill="#666">'
                   f"{escape(label)} removed (identity)</text></g>")
    return out


def _columns(cg: ChainGraph, xs: Dict[str, float], height: float) -> List[str]:
    out = []
    for col in cg.columns:
        x = xs[col.name]
        n = f"{len(col.kept)}/{col.size}" if col.status != "output" else f"{len(col.kept)} of {col.size}"
        out.append(f'<text class="layer-label" x="{x:.1f}" y="20" text-anchor="middle" font-weight="bold">'
                   f"{escape(col.label)}<title>{escape(col.name)}: {n} {'classes' if col.status == 'output' else 'filters kept'}"
                   f"</title></text>")
        out.append(f'<text x="{x:.1f}" y="33" text-anchor="middle" fill="#555">{n}</text>')
        if col.status in ("removed", "skipped"):
            why = "no filter kept" if col.status == "removed" else "inside a removed block"
            out.append(f'<g class="{col.status}-layer"><rect x="{x - 12:.1f}" y="{TOP}" width="24" height="{height - TOP - 10:.0f}" '
                       f'fill="{SKIP_FILL if col.status == "skipped" else "none"}" stroke="#999" stroke-dasharray="3 3">'
                       f"<title>{escape(col.label)} {col.status}: {why}</title></rect>"
                       f'<text x="{x + 3:.1f}" y="{TOP + 8}" transform="rotate(90 {x + 3:.1f} {TOP + 8})" fill="#777">'
                       f"{col.status}</text></g>")
    return out


def _edge_paths(cg, edges: List[Edge], pos, cols, class_names) -> List[str]:
    heaviest: Dict[str, float] = {}
    for e in edges:
        heaviest[e.dst_layer] = max(heaviest.get(e.dst_layer, 0.0), e.weight)
    out = ['<g class="edges" fill="none" stroke="#4a4a4a">']
    for e in edges:
        x0, y0, r0 = pos[(e.src_layer, e.src)]
        x1, y1, r1 = pos[(e.dst_layer, e.dst)]
        t = e.weight / heaviest[e.dst_layer]
        xa, xb = x0 + r0, x1 - r1 - (4 if e.dst_layer == "classes" else 0)
        bend = (xb - xa) * 0.45
        dst = cols[e.dst_layer]
        dst_name = (class_names[e.dst] if class_names and e.dst < len(class_names) else f"class {e.dst}") \
            if dst.status == "output" else _label(dst, e.dst)
        out.append(f'<path class="edge" d="M{xa:.1f},{y0:.1f} C{xa + bend:.1f},{y0:.1f} {xb - bend:.1f},{y1:.1f} '
                   f'{xb:.1f},{y1:.1f}" stroke-width="{0.3 + 2.2 * t:.2f}" stroke-opacity="{0.15 + 0.6 * t:.2f}">'
                   f"<title>{escape(_label(cols[e.src_layer], e.src))} → {escape(dst_name)}  "
                   f"Σ|W| = {e.weight:.4g}</title></path>")
    out.append("</g>")
    return out


def _colour_bar(x: float, lo: float, hi: float) -> List[str]:
    return [f'<g class="colour-bar"><text x="{x}" y="{TOP - 8}">score</text>',
            f'<rect x="{x}" y="{TOP}" width="14" height="120" fill="url(#score-bar)" stroke="#333" stroke-width="0.5">'
            f"<title>filter score: blue {lo:.3f} to red {hi:.3f}</title></rect>",
            f'<text x="{x + 18}" y="{TOP + 8}">{hi:.3f}</text>',
            f'<text x="{x + 18}" y="{TOP + 120}">{lo:.3f}</text></g>']
