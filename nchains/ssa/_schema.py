"""Field-by-field validation of a dependency graph's JSON form (``DependencyGraph.from_dict``).

Nodes and edges come back in the canonical order (layers topologically, then indices), so a
graph equals itself after any round trip, whatever order a file lists them in.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

__all__ = ["canonical", "check_int", "validated"]

_HASH_CHARS = set("0123456789abcdef")


def check_int(value: Any, name: str, low: int = 0, high: float = math.inf) -> int:
    """``value`` when it is an int (not a bool) in [low, high]; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {type(value).__name__} {value!r}")
    return value


def _node(value: Any, name: str, rank: Dict[str, int]) -> Tuple[str, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair [layer, index], got {value!r}")
    layer = _str(value[0], f"{name}[0]")
    if layer not in rank:
        raise ValueError(f"{name}: layer {layer!r} is not in layers")
    return layer, check_int(value[1], f"{name}[1]")


def canonical(nodes, edges, rank: Dict[str, int]):
    """Nodes sorted by (layer rank, index); edges by (upper, lower) in that order."""
    key = lambda n: (rank[n[0]], n[1])  # noqa: E731
    return sorted(nodes, key=key), sorted(edges, key=lambda e: (key(e[0]), key(e[1])))


def _meta(data: Dict[str, Any]) -> Dict[str, Any]:
    from nchains.ssa.dependency_graph import FORMAT, VERSION
    from nchains.ssa.step import RESPONSES

    if data.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"version must be {VERSION} (this nchains reads dependency graphs of version {VERSION}), "
                         f"got {data.get('version')!r}")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or len(set(map(str, layers))) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct unit names, got {layers!r:.200}")
    for i, layer in enumerate(layers):
        _str(layer, f"layers[{i}]")
    labels = data.get("labels")
    if not isinstance(labels, dict) or set(labels) != set(layers):
        raise ValueError("labels must map every name in layers to its label, and nothing else")
    for k, v in labels.items():
        _str(v, f"labels[{k!r}]")
    h = data.get("images_hash")
    if not isinstance(h, str) or len(h) != 64 or not set(h) <= _HASH_CHARS:
        raise ValueError(f"images_hash must be 64 lowercase hex digits (SHA-256), got {h!r}")
    if data.get("response") not in RESPONSES:
        raise ValueError(f"response must be one of {RESPONSES}, got {data.get('response')!r}")
    name = data.get("class_name")
    if name is not None:
        _str(name, "class_name")
    classifier = _str(data.get("classifier"), "classifier")
    if classifier not in layers:
        raise ValueError(f"classifier {classifier!r} is not in layers")
    return {"target": check_int(data.get("target"), "target"), "classifier": classifier,
            "layers": list(layers), "labels": dict(labels), "images_hash": h,
            "num_images": check_int(data.get("num_images"), "num_images", 1),
            "branching": check_int(data.get("branching"), "branching", 1), "response": data["response"],
            "class_name": name}


def _edges(raw: Any, meta: Dict[str, Any], nodes: set, rank: Dict[str, int]) -> Tuple[List, Dict]:
    if not isinstance(raw, list):
        raise TypeError(f"edges must be a list, got {type(raw).__name__}")
    edges, relevance = [], {}
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise TypeError(f"edges[{i}] must be an object with upper, lower, frequency, relevance")
        u, lo = _node(e.get("upper"), f"edges[{i}].upper", rank), _node(e.get("lower"), f"edges[{i}].lower", rank)
        for end, n in (("upper", u), ("lower", lo)):
            if n not in nodes:
                raise ValueError(f"edges[{i}].{end} {list(n)} is not in nodes")
        if rank[lo[0]] >= rank[u[0]]:
            raise ValueError(f"edges[{i}]: lower layer {lo[0]!r} does not come before upper layer {u[0]!r}")
        if (u, lo) in relevance:
            raise ValueError(f"edges[{i}]: edge {list(u)} -> {list(lo)} is listed twice")
        f = check_int(e.get("frequency"), f"edges[{i}].frequency", 1, meta["num_images"])
        r = e.get("relevance")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"edges[{i}].relevance must be a finite number, got {r!r}")
        edges.append((u, lo, f))
        relevance[(u, lo)] = float(r)
    return edges, relevance


def validated(data: Any) -> Dict[str, Any]:
    """The keyword arguments of ``DependencyGraph`` from its JSON form.

    Raises:
        TypeError/ValueError: naming the first bad field.
    """
    if not isinstance(data, dict):
        raise TypeError(f"a dependency graph must be a JSON object, got {type(data).__name__}")
    meta = _meta(data)
    rank = {n: i for i, n in enumerate(meta["layers"])}
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        raise TypeError(f"nodes must be a list of [layer, index] pairs, got {type(raw_nodes).__name__}")
    nodes = [_node(n, f"nodes[{i}]", rank) for i, n in enumerate(raw_nodes)]
    if len(set(nodes)) != len(nodes):
        raise ValueError("nodes must not repeat a node")
    root = (meta["classifier"], meta["target"])
    if root not in nodes:
        raise ValueError(f"nodes must hold the root [classifier, target] = {list(root)}")
    edges, relevance = _edges(data.get("edges"), meta, set(nodes), rank)
    reached = {root} | {lo for _, lo, _ in edges}
    stray = [n for n in nodes if n not in reached]
    if stray:
        raise ValueError(f"nodes[{nodes.index(stray[0])}] {list(stray[0])} has no edge into it and is not the root")
    nodes, edges = canonical(nodes, edges, rank)
    return {**meta, "nodes": nodes, "edges": edges, "relevance": relevance}
