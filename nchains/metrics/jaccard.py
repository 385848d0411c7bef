"""Overlap of two paths (paper 2, Sec. 2.4, Fig. 2): the Jaccard similarity |A ∩ B| / |A ∪ B|
of their neuron indicators, over the whole network and per site (layer).

Two empty selections are identical: their Jaccard similarity is defined as 1.

Example:
    >>> jaccard(p_intgrad, p_mct)                         # 0.41
    >>> jaccard(p_intgrad, p_mct, per_layer=True)["per_layer"]["layer4.1.relu@1"]
    >>> m = jaccard_matrix({"intgrad": p1, "mct": p2, "greedy": p3}, per_layer=True)
    >>> plot_jaccard(m, path="jaccard.png")
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

from nchains._util.io import PathLike
from nchains.metrics._common import mask_of, save_png

__all__ = ["jaccard", "jaccard_matrix", "plot_jaccard"]


def _counts(m1, m2):
    """(|A ∩ B|, |A ∪ B|) of two BoolTensors of one shape."""
    m2 = m2.to(m1.device)
    return int((m1 & m2).sum()), int((m1 | m2).sum())


def jaccard(p1, p2, per_layer: bool = False) -> Union[float, Dict[str, Any]]:
    """The Jaccard similarity of two paths' neuron indicators.

    Args:
        p1, p2 (CriticalPath or mapping str -> BoolTensor[*neuron shape]): two paths over the
            same sites (same keys, same shapes).
        per_layer (bool): also the similarity of each site's indicators.

    Returns:
        float in [0, 1] (network-wise: every neuron of every site pooled), or with
        ``per_layer`` a dict ``{"network": float, "per_layer": {site key: float}}`` in p1's order.

    Raises:
        TypeError, ValueError: not paths, or paths over different sites or shapes.
    """
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    a, b = mask_of(p1, "p1"), mask_of(p2, "p2")
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[0]
        raise ValueError(f"p1 and p2 must cover the same sites; {only!r} is in only one of them")
    layers, inter, union = {}, 0, 0
    for key, m in a.items():
        if tuple(m.shape) != tuple(b[key].shape):
            raise ValueError(f"p1 and p2 must have one shape per site; {key!r}: {list(m.shape)} vs "
                             f"{list(b[key].shape)}")
        i, u = _counts(m, b[key])
        layers[key] = 1.0 if u == 0 else i / u
        inter, union = inter + i, union + u
    network = 1.0 if union == 0 else inter / union
    return {"network": network, "per_layer": layers} if per_layer else network


def jaccard_matrix(paths: Mapping[str, Any], per_layer: bool = False) -> Dict[str, Any]:
    """Pairwise Jaccard similarities of named paths (Fig. 2a; with ``per_layer`` Fig. 2b).

    Args:
        paths (mapping name -> path): at least one path, all over the same sites.
        per_layer (bool): also one matrix per site.

    Returns:
        dict: ``names`` (list), ``matrix`` (list of lists, symmetric, 1 on the diagonal) and with
        ``per_layer`` ``layers`` (site keys in order) and ``per_layer`` (site key -> matrix).
    """
    if not isinstance(paths, Mapping) or not paths:
        raise ValueError("paths must be a non-empty mapping name -> path")
    names = list(paths)
    n = len(names)
    matrix = [[1.0] * n for _ in range(n)]
    layered: Dict[str, list] = {}
    for i in range(n):
        for j in range(i + 1, n):
            r = jaccard(paths[names[i]], paths[names[j]], per_layer=True)
            matrix[i][j] = matrix[j][i] = r["network"]
            for key, v in r["per_layer"].items():
                m = layered.setdefault(key, [[1.0] * n for _ in range(n)])
                m[i][j] = m[j][i] = v
    out: Dict[str, Any] = {"names": names, "matrix": matrix}
    if per_layer:
        keys = list(mask_of(paths[names[0]]))
        out["layers"] = keys
        out["per_layer"] = {k: layered.get(k, [[1.0]]) for k in keys}
    return out


def plot_jaccard(result: Mapping[str, Any], path: Optional[PathLike] = None, labels: Optional[Mapping] = None):
    """The network-wise Jaccard matrix as a heat map (left) and, when ``result`` has per-layer
    matrices, each pair's similarity along the sites (right).

    Args:
        result (dict of :func:`jaccard_matrix`).
        path (str or PathLike): where to write the PNG (atomically); None: only return the figure.
        labels (mapping site key -> str): tick labels of the sites (e.g. the papers' labels).

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    if not isinstance(result, Mapping) or "names" not in result or "matrix" not in result:
        raise ValueError("result must be a jaccard_matrix result (with 'names' and 'matrix')")
    names, matrix = result["names"], result["matrix"]
    layered = "per_layer" in result and len(names) > 1
    fig, axes = new_figure(2 if layered else 1, width=max(4.5, 0.6 * len(names) + 3.0))
    ax = axes[0] if layered else axes
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("Jaccard similarity of paths (network)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if layered:
        ax = axes[1]
        keys = result["layers"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                ax.plot(range(len(keys)), [result["per_layer"][k][i][j] for k in keys], "o-", ms=3,
                        label=f"{names[i]} / {names[j]}")
        ticks = [labels.get(k, k) if labels else k for k in keys]
        ax.set_xticks(range(len(keys)), ticks, rotation=60, ha="right", fontsize=6)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("site (execution order)")
        ax.set_ylabel("Jaccard similarity")
        ax.set_title("Jaccard similarity per layer", fontsize=10)
        ax.legend(fontsize=6)
    return save_png(fig, path)
