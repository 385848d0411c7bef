"""Field-by-field validation of a chain (the fields of :class:`nchains.Chain`, as loaded from
JSON or built in Python), with one-line errors naming the field path.

A chain file is untrusted input: an index of -1 would export filter 15 of a 16-filter layer
while the manifest claims -1, an index of 9999 or a short score list crashes deep inside the
exporter. :func:`validate_chain` checks types, lengths, ranges, uniqueness, finiteness and the
cross references (kept layers exist, regions name known layers, the strongest filters are kept
filters) before any of it is used. Plain Python: no schema library.

Example:
    >>> validate_chain({**chain_fields, "kept": {"conv1": [3, 99]}})
    ValueError: kept['conv1'][1]: index 99 out of range [0, 16)
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence

#: Fields a chain must have (the others have defaults).
REQUIRED = ("kept", "scores", "gates", "config", "seed", "model_hash", "images_hash", "metrics", "layer_sizes")
FAMILIES = ("resnet", "vgg", "other")
REGION_KINDS = ("block", "layer")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _fail(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what}")


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _dict(v: Any, where: str) -> Dict[str, Any]:
    if not isinstance(v, dict):
        _fail(where, f"must be an object (dict), got {_type_name(v)} {_short(v)}")
    for k in v:
        if not isinstance(k, str):
            _fail(where, f"keys must be strings, got {_type_name(k)} {k!r}")
    return v


def _list(v: Any, where: str) -> Sequence[Any]:
    if not isinstance(v, (list, tuple)):
        _fail(where, f"must be a list, got {_type_name(v)} {_short(v)}")
    return v


def _int(v: Any, where: str, low: Optional[int] = None, high: Optional[int] = None, what: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(where, f"must be an int, got {_type_name(v)} {_short(v)}")
    if (low is not None and v < low) or (high is not None and v >= high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'})"
        _fail(where, f"{what or 'value'} {v} out of range {bounds}")
    return v


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(where, f"must be a number, got {_type_name(v)} {_short(v)}")
    if not math.isfinite(v):
        _fail(where, f"must be a finite number, got {v!r}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_chain(data: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first invalid field of a chain.

    Args:
        data (dict): the chain's fields (``Chain.to_dict()`` without ``format``/``version``;
            version-1/2 files' ``paths`` already renamed to ``strongest_filters``).

    Raises:
        ValueError: ``"<field path>: <what is wrong>"``, e.g.
            ``kept['layer1.0.conv1'][3]: index 9999 out of range [0, 16)``.
    """
    _dict(data, "chain")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        _fail("chain", f"missing field(s) {missing}")
    sizes = _layer_sizes(data["layer_sizes"])
    regions = _regions(data.get("regions", {}), sizes)
    _gates(data["gates"], regions)
    kept = _kept(data["kept"], sizes)
    _scores(data["scores"], kept)
    _labels(data.get("labels", {}), sizes, regions)
    _input_shape(data.get("input_shape", []))
    if data.get("family", "other") not in FAMILIES:
        _fail("family", f"must be one of {list(FAMILIES)}, got {_short(data.get('family'))}")
    names = _class_names(data.get("class_names"))
    classes = _classes(data.get("classes", []), names)
    _strongest(data.get("strongest_filters", {}), kept, classes)
    _history(data.get("history", {}))
    _config(data["config"], data["seed"])
    for name in ("model_hash", "images_hash"):
        v = data[name]
        if not isinstance(v, str) or not _HEX64.fullmatch(v):
            _fail(name, f"must be a SHA-256 digest (64 lowercase hex characters), got {_short(v)}")
    _metrics(data["metrics"], kept, sizes)
    for name in ("model_spec", "images_source"):
        v = data.get(name)
        if v is not None:
            _dict(v, name)
            if "kind" in v and not isinstance(v["kind"], str):
                _fail(f"{name}['kind']", f"must be a string, got {_short(v['kind'])}")


def _layer_sizes(v: Any) -> Dict[str, int]:
    for name, size in _dict(v, "layer_sizes").items():
        _int(size, f"layer_sizes[{name!r}]", 1, None, "size")
    return v


def _regions(v: Any, sizes: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    for name, info in _dict(v, "regions").items():
        where = f"regions[{name!r}]"
        _dict(info, where)
        extra = sorted(set(info) - {"kind", "layers"})
        if extra or "kind" not in info or "layers" not in info:
            _fail(where, f"must have exactly the keys 'kind' and 'layers', got {sorted(info)}")
        if info["kind"] not in REGION_KINDS:
            _fail(f"{where}['kind']", f"must be one of {list(REGION_KINDS)}, got {_short(info['kind'])}")
        for i, layer in enumerate(_list(info["layers"], f"{where}['layers']")):
            if not isinstance(layer, str) or layer not in sizes:
                _fail(f"{where}['layers'][{i}]", f"{_short(layer)} is not a layer of layer_sizes")
    return v


def _gates(v: Any, regions: Dict[str, Any]) -> Dict[str, int]:
    for name, g in _dict(v, "gates").items():
        if name not in regions:
            _fail(f"gates[{name!r}]", f"names no region of regions (known: {_few(regions)})")
        if isinstance(g, bool) or g not in (0, 1) or not isinstance(g, int):
            _fail(f"gates[{name!r}]", f"must be 0 (region removed) or 1 (kept), got {_short(g)}")
    return v


def _kept(v: Any, sizes: Dict[str, int]) -> Dict[str, Sequence[int]]:
    for layer, idx in _dict(v, "kept").items():
        where = f"kept[{layer!r}]"
        if layer not in sizes:
            _fail(where, f"names no layer of layer_sizes (known: {_few(sizes)})")
        previous = -1
        for i, f in enumerate(_list(idx, where)):
            _int(f, f"{where}[{i}]", 0, sizes[layer], "index")
            if f <= previous:
                _fail(f"{where}[{i}]", f"index {f} {'repeats' if f == previous else 'is out of order'}: "
                                       "kept indices must be sorted and unique")
            previous = f
    return v


def _scores(v: Any, kept: Dict[str, Sequence[int]]) -> None:
    for layer, values in _dict(v, "scores").items():
        where = f"scores[{layer!r}]"
        if layer not in kept:
            _fail(where, "names no layer of kept")
        for i, s in enumerate(_list(values, where)):
            _number(s, f"{where}[{i}]")
    for layer, idx in kept.items():
        got = len(v.get(layer, ()))
        if got != len(idx):
            _fail(f"scores[{layer!r}]", f"has {got} scores but kept[{layer!r}] has {len(idx)} filters "
                                        "(one score per kept filter)")


def _labels(v: Any, sizes: Dict[str, int], regions: Dict[str, Any]) -> None:
    for name, label in _dict(v, "labels").items():
        if name not in sizes and name not in regions:
            _fail(f"labels[{name!r}]", "names neither a layer of layer_sizes nor a region of regions")
        if not isinstance(label, str) or not label:
            _fail(f"labels[{name!r}]", f"must be a non-empty string, got {_short(label)}")


def _input_shape(v: Any) -> None:
    if len(_list(v, "input_shape")) != 3:
        _fail("input_shape", f"must be 3 positive ints [C, H, W], got {_short(v)}")
    for i, d in enumerate(v):
        _int(d, f"input_shape[{i}]", 1, None, "size")


def _class_names(v: Any) -> Optional[Sequence[str]]:
    if v is None:
        return None
    for i, name in enumerate(_list(v, "class_names")):
        if not isinstance(name, str):
            _fail(f"class_names[{i}]", f"must be a string, got {_type_name(name)} {_short(name)}")
    return v


def _classes(v: Any, names: Optional[Sequence[str]]) -> Sequence[int]:
    seen = set()
    for i, c in enumerate(_list(v, "classes")):
        _int(c, f"classes[{i}]", 0, len(names) if names is not None else None, "class")
        if c in seen:
            _fail(f"classes[{i}]", f"class {c} repeats")
        seen.add(c)
    return v


def _strongest(v: Any, kept: Dict[str, Sequence[int]], classes: Sequence[int]) -> None:
    for c, entries in _dict(v, "strongest_filters").items():
        where = f"strongest_filters[{c!r}]"
        if not c.isdigit() or int(c) not in classes:
            _fail(where, f"must be keyed by one of classes {list(classes)} (as a string), got {c!r}")
        for i, entry in enumerate(_list(entries, where)):
            at = f"{where}[{i}]"
            if len(_list(entry, at)) != 3:
                _fail(at, f"must be [layer, filter index, contribution], got {_short(entry)}")
            layer, index, contrib = entry
            if not isinstance(layer, str) or layer not in kept:
                _fail(f"{at}[0]", f"{_short(layer)} names no layer of kept")
            _int(index, f"{at}[1]")
            if index not in kept[layer]:
                _fail(f"{at}[1]", f"filter {index} is not a kept filter of {layer!r}")
            if _number(contrib, f"{at}[2]") < 0:
                _fail(f"{at}[2]", f"a contribution |a * dy/da| is >= 0, got {contrib!r}")


def _history(v: Any) -> None:
    for phase, losses in _dict(v, "history").items():
        for i, x in enumerate(_list(losses, f"history[{phase!r}]")):
            _number(x, f"history[{phase!r}][{i}]")


def _config(v: Any, seed: Any) -> None:
    from nchains.neurochains.config import NeuroChainsConfig

    _dict(v, "config")
    try:
        cfg = NeuroChainsConfig.from_dict(v)
    except (TypeError, ValueError) as exc:
        _fail("config", str(exc))
    _int(seed, "seed", 0, 2**63)
    if seed != cfg.seed:
        _fail("seed", f"{seed} differs from config['seed'] {cfg.seed}")


def _metrics(v: Any, kept: Dict[str, Sequence[int]], sizes: Dict[str, int]) -> None:
    for name, x in _dict(v, "metrics").items():
        _number(x, f"metrics[{name!r}]")
    claims = {"filters_kept": sum(len(idx) for idx in kept.values()), "filters_total": sum(sizes.values())}
    for name, actual in claims.items():
        if name in v and v[name] != actual:
            _fail(f"metrics[{name!r}]", f"claims {v[name]} but the chain has {actual}")


def _few(names: Mapping[str, Any]) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:4])
    return shown + (f", … ({len(names)} in all)" if len(names) > 4 else "") if names else "none"


def check_against_graph(layer_sizes: Mapping[str, int], regions: Mapping[str, Mapping[str, Any]], graph,
                        score_linear: bool) -> None:
    """Raises ValueError naming the first layer or region where a (valid) chain and a model's
    analysis disagree: the chain must score exactly the model's filter layers (and hidden
    Linears when ``score_linear``) with the same widths, and gate exactly its regions.

    Args:
        layer_sizes (dict layer -> int), regions (dict region -> {"kind", "layers"}): the chain's.
        graph (ModelGraph): :func:`nchains.analyze` of the model at the chain's input shape.
        score_linear (bool): the chain's ``config["score_linear"]``.
    """
    expected = {name: u.out_channels for name, u in graph.layers.items()}
    if score_linear:
        expected.update({name: u.out_features for name, u in graph.linears.items() if not u.is_classifier})
    prefix = "the chain does not match the model"
    for name, size in layer_sizes.items():
        if name not in expected:
            _fail(prefix, f"the chain's layer {name!r} is not a scored layer of the model "
                          f"(the model's: {_few(expected)})")
        if expected[name] != size:
            _fail(prefix, f"layer {name!r} has {size} filters in the chain but {expected[name]} in the model")
    for name in expected:
        if name not in layer_sizes:
            _fail(prefix, f"the model's layer {name!r} is missing from the chain's layer_sizes")
    for name, info in regions.items():
        region = graph.regions.get(name)
        if region is None:
            _fail(prefix, f"the chain's region {name!r} is not a gateable region of the model "
                          f"(the model's: {_few(graph.regions)})")
        if info["kind"] != region.kind or list(info["layers"]) != list(region.units):
            _fail(prefix, f"region {name!r} is a {info['kind']} of layers {list(info['layers'])} in the chain "
                          f"but a {region.kind} of {list(region.units)} in the model")
    for name in graph.regions:
        if name not in regions:
            _fail(prefix, f"the model's region {name!r} is missing from the chain's regions")
