"""Critical-path files: one ``.npz`` per path, written atomically, validated field by field.

Layout (``numpy.savez_compressed``, read with ``allow_pickle=False``):

- ``meta``: a 0-d string array holding JSON: ``format`` (``"nchains-critical-path"``),
  ``version`` (:data:`VERSION`), ``method``, ``target``, ``requested_sparsity``, ``sparsity``,
  ``kept``, ``total``, ``model_hash`` (:func:`nchains._util.io.hash_model`), ``model_spec``
  (``{"kind": "default"}`` for the shipped model, else None), ``image_shape``, ``dtype``,
  ``contributions`` (bool) and ``sites`` (per activation site in execution order: ``key``,
  ``label``, ``shape``, ``kept``);
- ``image``: the input, float ``[1, C, H, W]``;
- ``mask_<i>``: bool, the i-th site's neuron shape; ``contrib_<i>``: float, when recorded.

Loading checks the format and version, every field's type, that the model's weights hash to
``model_hash``, that the sites are exactly the model's activation sites with the recorded
shapes, that each mask is bool of that shape holding the recorded count, that nothing else is
in the file, and that the image and contributions are finite; the first problem is named.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from nchains._util.io import PathLike, hash_model, write_atomic
from nchains.graph.analysis import ModelGraph

__all__ = ["FORMAT", "VERSION", "load_path", "path_bytes", "save_path"]

FORMAT = "nchains-critical-path"
VERSION = 1
_NUMPY_DTYPES = {"torch.float32": np.float32, "torch.float64": np.float64, "torch.float16": np.float16}


def _meta(path, model_hash: str, spec, with_contrib: bool) -> Dict[str, Any]:
    summary = path.summary()
    return {"format": FORMAT, "version": VERSION, "method": path.method, "target": path.target,
            "requested_sparsity": path.requested_sparsity, "sparsity": path.sparsity, "kept": path.n_kept,
            "total": path.n_total, "model_hash": model_hash, "model_spec": spec,
            "image_shape": list(path.image.shape), "dtype": str(path.image.dtype), "contributions": with_contrib,
            "sites": [{k: s[k] for k in ("key", "label", "shape", "kept")} for s in summary["sites"]]}


def path_bytes(path, contributions: bool = True) -> bytes:
    """The file contents of the :class:`~nchains.critical_paths.path.CriticalPath` ``path`` (see
    the module docstring); ``contributions``: also store them (when the path has them)."""
    from nchains.models.spec import spec_of_model_hash

    if not isinstance(contributions, bool):
        raise TypeError(f"contributions must be a bool, got {type(contributions).__name__}")
    model_hash = hash_model(path.model)
    with_contrib = contributions and path.contributions is not None
    arrays = {"meta": np.array(json.dumps(_meta(path, model_hash, spec_of_model_hash(model_hash), with_contrib))),
              "image": path.image.detach().cpu().numpy()}
    for i, s in enumerate(path.sites):
        arrays[f"mask_{i}"] = path.mask[s.key].cpu().numpy()
        if with_contrib:
            arrays[f"contrib_{i}"] = path.contributions[s.key].detach().cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def save_path(path, file: PathLike, contributions: bool = True) -> None:
    """Writes :func:`path_bytes` to ``file`` atomically (one rename: the previous file or the new one)."""
    write_atomic(file, path_bytes(path, contributions))


def _read(file: PathLike) -> Dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"path file {str(file)!r} is not a critical-path file (.npz): {exc}") from None


def _field(meta: Dict[str, Any], name: str, types, what: str):
    value = meta.get(name)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        value = None  # True is an int to Python; never a valid count or index here
    if not isinstance(value, types):
        raise ValueError(f"path file meta.{name} must be {what}, got {value!r}")
    return value


def _check_meta(arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    raw = arrays.get("meta")
    if raw is None or raw.dtype.kind != "U" or raw.shape != ():
        raise ValueError("path file has no JSON 'meta' entry; it is not a critical-path file")
    try:
        meta = json.loads(str(raw))
    except ValueError as exc:
        raise ValueError(f"path file meta is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"path file meta.format must be {FORMAT!r}, got "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"path file version {meta.get('version')!r} is not supported; accepted: {VERSION}")
    _field(meta, "method", str, "a str")
    _field(meta, "target", int, "an int class index")
    _field(meta, "kept", int, "an int")
    _field(meta, "total", int, "an int")
    _field(meta, "model_hash", str, "a SHA-256 hex str")
    _field(meta, "contributions", bool, "a bool")
    _field(meta, "sites", list, "a list of sites")
    for name in ("requested_sparsity", "sparsity"):
        value = meta.get(name)
        if not (value is None and name == "requested_sparsity") and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and 0 <= value <= 1):
            raise ValueError(f"path file meta.{name} must be a number in [0, 1], got {value!r}")
    spec = meta.get("model_spec")
    if spec is not None and spec != {"kind": "default"}:
        raise ValueError(f"path file meta.model_spec must be {{'kind': 'default'}} or null, got {spec!r}")
    if meta.get("dtype") not in _NUMPY_DTYPES:
        raise ValueError(f"path file meta.dtype must be one of {sorted(_NUMPY_DTYPES)}, got {meta.get('dtype')!r}")
    return meta


def _model_for(meta: Dict[str, Any], model: Optional[nn.Module]) -> nn.Module:
    if model is None:
        if meta.get("model_spec") != {"kind": "default"}:
            raise ValueError("the path was computed on a model other than the shipped one: pass model=")
        from nchains.models import zoo

        model = zoo.default_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if hash_model(model) != meta["model_hash"]:
        raise ValueError(f"model does not match the path file: its weights hash to {hash_model(model)[:12]}…, the "
                         f"file records {meta['model_hash'][:12]}…")
    return model


def _check_sites(meta: Dict[str, Any], arrays: Dict[str, np.ndarray], all_sites) -> Dict[str, Dict[str, torch.Tensor]]:
    recorded = meta["sites"]
    known = {s.key for s in all_sites}
    for i, entry in enumerate(recorded):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ValueError(f"path file meta.sites[{i}] must be an object with a str key, got {entry!r}")
        if entry["key"] not in known:
            raise ValueError(f"path file meta.sites[{i}]: unknown site {entry['key']!r} (not an activation site "
                             "of this model)")
    keys = [e["key"] for e in recorded]
    if keys != [s.key for s in all_sites]:
        missing = [s.key for s in all_sites if s.key not in keys]
        raise ValueError("path file meta.sites must list every activation site of the model in execution order"
                         + (f"; missing {missing[0]!r}" if missing else "; the order differs"))
    expected = {"meta", "image", *(f"mask_{i}" for i in range(len(keys))),
                *((f"contrib_{i}" for i in range(len(keys))) if meta["contributions"] else ())}
    extra, absent = sorted(set(arrays) - expected), sorted(expected - set(arrays))
    if extra or absent:
        what = f"unexpected {extra[0]!r}" if extra else f"missing {absent[0]!r}"
        raise ValueError(f"path file entries: {what}")
    masks, contrib = {}, {}
    for i, (entry, s) in enumerate(zip(recorded, all_sites)):
        shape = list(s.shape[1:])
        if entry.get("shape") != shape:
            raise ValueError(f"path file meta.sites[{i}].shape {entry.get('shape')!r} != the model's {shape} at "
                             f"{s.key!r}")
        m = arrays[f"mask_{i}"]
        if m.dtype != np.bool_ or list(m.shape) != shape:
            raise ValueError(f"path file mask_{i} ({s.key!r}) must be bool of shape {shape}, got {m.dtype} "
                             f"{list(m.shape)}")
        if entry.get("kept") != int(m.sum()) or isinstance(entry.get("kept"), bool):
            raise ValueError(f"path file meta.sites[{i}].kept {entry.get('kept')!r} != the mask's {int(m.sum())}")
        masks[s.key] = torch.from_numpy(m.copy())
        if meta["contributions"]:
            c = arrays[f"contrib_{i}"]
            if c.dtype.kind != "f" or list(c.shape) != shape or not np.isfinite(c).all():
                raise ValueError(f"path file contrib_{i} ({s.key!r}) must be finite floats of shape {shape}")
            contrib[s.key] = torch.from_numpy(c.copy())
    return {"mask": masks, "contributions": contrib if meta["contributions"] else None}


def _check_image(meta: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> torch.Tensor:
    img = arrays["image"] if "image" in arrays else None
    shape = meta.get("image_shape")
    if img is None or img.dtype != _NUMPY_DTYPES[meta["dtype"]] or list(img.shape) != shape or img.ndim != 4:
        raise ValueError(f"path file image must be {meta['dtype']} of shape {shape} (meta.image_shape), got "
                         f"{None if img is None else (img.dtype, list(img.shape))}")
    if not np.isfinite(img).all():
        raise ValueError("path file image contains NaN/Inf")
    return torch.from_numpy(img.copy())


def load_path(file: PathLike, model: Optional[nn.Module] = None, graph: Optional[ModelGraph] = None):
    """Reads and validates a critical-path file (see the module docstring).

    Args:
        file (path-like): written by :meth:`CriticalPath.save`.
        model (nn.Module): the path's model; default: the shipped model when the file records it.
        graph (ModelGraph): ``nchains.analyze(model, image)`` to reuse (checked).

    Returns:
        CriticalPath.

    Raises:
        ValueError: naming the first field that is missing, of the wrong type, or does not fit
            the model; OSError when the file cannot be read.
    """
    from nchains.critical_paths.path import CriticalPath, check_image
    from nchains.graph.analysis import graph_for
    from nchains.instrument.taps import sites

    arrays = _read(file)
    meta = _check_meta(arrays)
    model = _model_for(meta, model)
    image = check_image(_check_image(meta, arrays), model)
    graph = graph_for(model, image.shape[1:], graph, example=image)
    checked = _check_sites(meta, arrays, sites(graph, "activations"))
    path = CriticalPath(model, image, checked["mask"], target=meta["target"], method=meta["method"],
                        contributions=checked["contributions"], graph=graph,
                        requested_sparsity=meta["requested_sparsity"])
    if path.n_kept != meta["kept"] or path.n_total != meta["total"]:
        raise ValueError(f"path file meta.kept/total {meta['kept']}/{meta['total']} != the masks' "
                         f"{path.n_kept}/{path.n_total}")
    return path
