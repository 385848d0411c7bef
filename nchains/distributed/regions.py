"""The regions of a batch run: what one Ray task extracts a chain for.

A region is a small JSON-able dict, never tensors, so that a task carries only what a worker
needs to rebuild its inputs::

    {"id": "sneaker+ankle-boot@seed0", "classes": ["sneaker", "ankle-boot"], "seed": 0,
     "model": {"kind": "default"},                       # a model spec (nchains.models.spec)
     "images": {"kind": "default", ...}}                 # an images source (nchains.models.image_source)

A folder source may leave ``size`` and ``preprocessing`` None: the worker completes them from the
model (:func:`nchains.models.spec.spec_preprocessing`) once it has loaded it.

:func:`pair_regions` makes class pairs x seeds on one model; :func:`load_region_spec` reads a
YAML file of regions, checked field by field (one-line errors naming the entry and the field).
"""

from __future__ import annotations

import itertools
import os
import random
import re
from typing import Any, Dict, List, Optional, Sequence

from nchains.models.image_source import default_source

__all__ = ["pair_regions", "load_region_spec", "region_dir_name", "SPEC_FIELDS"]

MAX_REGIONS = 100_000
MAX_SEEDS = 10_000
#: Fields a YAML region entry may have (``classes`` is required).
SPEC_FIELDS = ("name", "classes", "images", "model", "weights", "num_classes", "per_class", "size",
               "preprocessing", "seed", "seeds", "confident")
_SAFE = re.compile(r"[^A-Za-z0-9._+@=-]")


def region_dir_name(region_id: str) -> str:
    """A file-name-safe form of a region id (for ``chains/<name>.json`` and ``exports/<name>/``)."""
    name = _SAFE.sub("_", region_id).strip(".")
    return name or "region"


def _check_int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field} must be an integer between {low} and {high}, got {value!r}")
    return value


def _region(classes: List[str], seed: int, model: Dict[str, Any], images: Dict[str, Any],
            name: Optional[str] = None) -> Dict[str, Any]:
    base = name or "+".join(classes)
    return {"id": f"{base}@seed{seed}", "classes": list(classes), "seed": seed, "model": model, "images": images}


def pair_regions(pairs: int, seeds: int = 1, classes_from: Optional[Sequence[str]] = None, *, per_class: int = 10,
                 confident: Optional[float] = 0.95) -> List[Dict[str, Any]]:
    """``pairs`` class pairs x ``seeds`` seeds of the shipped model on its shipped images.

    The pairs are all pairs of ``classes_from`` (default the shipped model's ten classes) in a
    fixed shuffled order (``random.Random(0)``), so ``--pairs 4`` is a prefix of ``--pairs 8``;
    region ``(pair, s)`` picks its images and runs its extraction with seed ``s``.

    Raises:
        ValueError: ``pairs`` or ``seeds`` out of range, an unknown or repeated class.
    """
    from nchains.models import zoo

    names = zoo.default_class_names()
    classes = list(classes_from) if classes_from is not None else list(names)
    for c in classes:
        zoo._class_index(c)  # ValueError naming the accepted names
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes_from must name at least two different classes, got {classes}")
    every = list(itertools.combinations(classes, 2))
    random.Random(0).shuffle(every)
    _check_int(pairs, "pairs", 1, len(every))
    _check_int(seeds, "seeds", 1, MAX_SEEDS)
    _check_int(per_class, "per_class", 1, 100)
    out = []
    for pair in every[:pairs]:
        for s in range(seeds):
            out.append(_region(list(pair), s, {"kind": "default"}, default_source(list(pair), per_class, s, confident)))
    return out


def _entry_images(entry: Dict[str, Any], where: str, classes: List[str], seed: int, spec: Dict[str, Any],
                  base: str) -> Dict[str, Any]:
    from nchains.models.images import PREPROCESSING

    per_class = _check_int(entry.get("per_class", 10), f"{where}.per_class", 1, 100_000)
    images = entry.get("images")
    if images is None:
        if spec.get("kind") != "default":
            raise ValueError(f"{where}.images is required with a model other than the default (a folder of class "
                             "sub-folders)")
        for field in ("size", "preprocessing"):
            if field in entry:
                raise ValueError(f"{where}.{field} applies to an images folder (the shipped images are 28x28)")
        confident = entry.get("confident", 0.95)
        if confident is not None and (isinstance(confident, bool) or not isinstance(confident, (int, float))
                                      or not 0.0 < confident <= 1.0):
            raise ValueError(f"{where}.confident must be a probability in (0, 1] or null, got {confident!r}")
        return default_source(classes, per_class, seed, None if confident is None else float(confident))
    if not isinstance(images, str) or not images:
        raise ValueError(f"{where}.images must be a folder path (a string), got {images!r}")
    path = images if os.path.isabs(images) else os.path.join(base, images)
    if not os.path.isdir(path):
        raise ValueError(f"{where}.images {images!r} is not a folder (relative paths are from the spec's folder)")
    if "confident" in entry:
        raise ValueError(f"{where}.confident applies to the shipped images only, not to an images folder")
    size = entry.get("size")
    if size is not None:
        _check_int(size, f"{where}.size", 1, 4096)
    pre = entry.get("preprocessing")
    if pre is not None and pre not in PREPROCESSING:
        raise ValueError(f"{where}.preprocessing must be one of {', '.join(PREPROCESSING)}, got {pre!r}")
    return {"kind": "folder", "path": os.path.abspath(path), "size": size, "preprocessing": pre,
            "classes": list(classes), "per_class": per_class}


def _entry_spec(entry: Dict[str, Any], where: str, base: str) -> Dict[str, Any]:
    from nchains.models.spec import parse_model_spec

    model, weights = entry.get("model"), entry.get("weights")
    for field, value in (("model", model), ("weights", weights)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}.{field} must be a string, got {value!r}")
    if model and not model.startswith("torchvision:") and model != "default" and not os.path.isabs(model):
        model = os.path.join(base, model)
    if weights and not os.path.isabs(weights):
        weights = os.path.join(base, weights)
    try:
        return parse_model_spec(model, weights, entry.get("num_classes"))
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).replace('--', '')}") from None


def _entry_regions(entry: Any, where: str, base: str) -> List[Dict[str, Any]]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping with at least 'classes', got {type(entry).__name__}")
    unknown = sorted(set(map(str, entry)) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} (accepted: {', '.join(SPEC_FIELDS)})")
    classes = entry.get("classes")
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ValueError(f"{where}.classes must be a list of different class names, got {classes!r}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
    if "seed" in entry and "seeds" in entry:
        raise ValueError(f"{where}: give seed (one run) or seeds (runs with seeds 0..seeds-1), not both")
    seeds = ([_check_int(entry["seed"], f"{where}.seed", 0, 2**63 - 1)] if "seed" in entry
             else list(range(_check_int(entry.get("seeds", 1), f"{where}.seeds", 1, MAX_SEEDS))))
    spec = _entry_spec(entry, where, base)
    if spec.get("kind") == "default" and entry.get("images") is None:
        from nchains.models import zoo

        for c in classes:
            try:
                zoo._class_index(c)
            except ValueError as exc:
                raise ValueError(f"{where}.classes: {str(exc).replace('classes: ', '')}") from None
    return [_region(classes, s, spec, _entry_images(entry, where, classes, s, spec, base), name) for s in seeds]


def load_region_spec(path: str) -> List[Dict[str, Any]]:
    """The regions of a YAML spec file.

    The file holds ``regions:``, a list of entries; each has ``classes`` (list of names) and
    optionally ``name``, ``images`` (a folder of class sub-folders; relative to the spec's
    folder), ``model`` (``default``, ``torchvision:NAME`` or a model file), ``weights``,
    ``num_classes``, ``per_class`` (10), ``size``, ``preprocessing``, ``confident`` (shipped
    images only) and ``seed`` or ``seeds`` (runs with seeds ``0..seeds-1``; default one run,
    seed 0). Example::

        regions:
          - classes: [sneaker, ankle-boot]
            seeds: 3
          - name: pets
            model: torchvision:resnet18
            weights: resnet18.pth
            images: data/pets
            classes: [cat, dog]

    Raises:
        ValueError: naming the entry and the field (``regions[2].per_class must be ...``), an
            unreadable file, or two regions with the same id.
    """
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"spec {path!r} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"spec {path!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or set(data) != {"regions"}:
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"spec {path!r} must be a mapping with the one key 'regions' (a list), got {got}")
    entries = data["regions"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"spec {path!r}: regions must be a non-empty list of entries, got {entries!r}")
    base = os.path.dirname(os.path.abspath(path))
    out: List[Dict[str, Any]] = []
    for i, entry in enumerate(entries):
        out.extend(_entry_regions(entry, f"regions[{i}]", base))
    seen: Dict[str, int] = {}
    for r in out:
        if r["id"] in seen:
            raise ValueError(f"spec {path!r}: two regions have the id {r['id']!r}; give the entries different "
                             "names (name: ...) or seeds")
        seen[r["id"]] = 1
    if len(out) > MAX_REGIONS:
        raise ValueError(f"spec {path!r} makes {len(out)} regions; at most {MAX_REGIONS} per batch")
    return out
