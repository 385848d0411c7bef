"""Inspecting exported chains: what an artifact contains and whether it is the one exported.

:func:`inspect_artifact` reads an export directory, its ``manifest.json``, one artifact
(``chain.ts``, ``chain.onnx``, ``chain.pt2``) or a chain JSON, without running any model
code: the metadata embedded in TorchScript and pt2 archives is read from the zip, ONNX
metadata from ``metadata_props``. Every artifact is re-hashed against the manifest, and the
metadata it embeds is compared with the manifest, so a tampered or swapped file is reported.

Example:
    >>> report = inspect_artifact("out/chain.onnx")
    >>> print(format_report(report)); report["ok"]
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from nchains._util.io import PathLike, hash_file

__all__ = ["METADATA_KEY", "MANIFEST", "RUNTIMES", "model_stats", "read_embedded", "inspect_artifact", "format_report"]

#: Name of the metadata in TorchScript and pt2 extra files, and key in ONNX metadata_props.
METADATA_KEY = "nchains.json"
MANIFEST = "manifest.json"
EXPORT_FORMAT = "nchains.export"
FILES = {"torchscript": "chain.ts", "onnx": "chain.onnx", "pt2": "chain.pt2", "aoti": "chain.aoti.pt2"}
#: Format -> which runtime loads its file, and how (the manifest's ``artifacts`` entries carry them).
RUNTIMES = {
    "torchscript": {"runtime": "libtorch / torch.jit.load (TorchScript, deprecated upstream)",
                    "load": "torch.jit.load(path)"},
    "onnx": {"runtime": "onnxruntime (or any ONNX runtime, e.g. Triton)", "load": "onnxruntime.InferenceSession(path)"},
    "pt2": {"runtime": "PyTorch torch.export", "load": "torch.export.load(path).module()"},
    "aoti": {"runtime": "AOTInductor (compiled CPU code; PyTorch or libtorch C++, no Python needed)",
             "load": "torch._inductor.aoti_load_package(path) / C++ AOTIModelPackageLoader"},
}
_SUFFIX = {".aoti.pt2": "aoti", ".ts": "torchscript", ".onnx": "onnx", ".pt2": "pt2"}


def model_stats(model: nn.Module, input_shape) -> Dict[str, int]:
    """Parameters and multiply-accumulates (MACs) of one forward pass on one sample.

    MACs of Conv2d and Linear layers (the "FLOPs" of torchvision's model tables and the pruning
    literature, which are multiply-accumulates: twice as many floating-point operations);
    elementwise ops, pooling and index ops are not counted.

    Args:
        model (nn.Module): any model made of ``nn.Conv2d``/``nn.Linear`` modules (run eagerly).
        input_shape (sequence of int): ``[C, H, W]`` of one sample.

    Returns:
        dict: ``params`` (number of parameter elements) and ``macs``.
    """
    macs = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs[0] += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            macs[0] += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    from nchains._util.device import example_input

    x = example_input(model, input_shape)  # the model's device and dtype
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "macs": int(macs[0])}


# ---- reading artifacts ----------------------------------------------------------------------


def _kind(path: str) -> str:
    suffix = next((s for s in _SUFFIX if path.lower().endswith(s)), os.path.splitext(path)[1].lower())
    if suffix in _SUFFIX:
        return _SUFFIX[suffix]
    if suffix == ".json":
        return "json"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ValueError(f"path {path!r} cannot be read: {exc}") from None
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any("/data/aotinductor/" in n for n in names):
            return "aoti"
        return "pt2" if any(n.endswith("archive_format") for n in names) else "torchscript"
    return "onnx"


def read_embedded(path: PathLike, fmt: Optional[str] = None) -> Dict[str, Any]:
    """The nchains metadata embedded in an artifact, read without loading the model.

    Raises:
        ValueError: when the file is not a readable artifact or carries no nchains metadata.
    """
    path = os.fspath(path)
    fmt = fmt or _kind(path)
    try:
        if fmt in ("torchscript", "pt2", "aoti"):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(f"/extra/{METADATA_KEY}")]
                if not names:
                    raise ValueError(f"{path!r} carries no nchains metadata (extra file {METADATA_KEY})")
                text = z.read(names[0]).decode()
        elif fmt == "onnx":
            import onnx

            proto = onnx.load(path, load_external_data=False)
            props = {p.key: p.value for p in proto.metadata_props}
            if METADATA_KEY not in props:
                raise ValueError(f"{path!r} carries no nchains metadata (metadata_props[{METADATA_KEY!r}])")
            text = props[METADATA_KEY]
        else:
            raise ValueError(f"{path!r} is not an artifact (expected .ts, .onnx, .pt2 or .aoti.pt2)")
        return json.loads(text)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file of any kind is the same finding
        raise ValueError(f"{path!r} is not a readable {fmt} artifact: {type(exc).__name__}: {exc}") from None


def _load_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"path {path!r} is not a readable JSON file: {exc}") from None


def _strip(meta: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "artifacts"}


def _canonical(meta: Dict[str, Any]) -> str:
    return json.dumps(_strip(meta), sort_keys=True)


def _check_artifact(folder: str, fmt: str, entry: Dict[str, Any], manifest: Dict[str, Any]) -> Dict[str, Any]:
    from nchains.export.folder import artifact_path

    path = artifact_path(folder, f"artifacts.{fmt}.file", entry.get("file"))  # never outside the folder
    status = {"format": fmt, "file": path, "expected_sha256": entry.get("sha256")}
    if not os.path.isfile(path):
        return {**status, "status": "missing", "ok": False}
    digest = hash_file(path)
    status["sha256"] = digest
    if digest != entry.get("sha256"):
        return {**status, "status": "TAMPERED: SHA-256 differs from the manifest", "ok": False}
    try:
        embedded = read_embedded(path, fmt)
    except ValueError as exc:
        return {**status, "status": f"unreadable: {exc}", "ok": False}
    if _canonical(embedded) != _canonical(manifest):
        return {**status, "status": "TAMPERED: embedded metadata differs from the manifest", "ok": False}
    return {**status, "status": "verified", "ok": True}


def inspect_artifact(path: PathLike) -> Dict[str, Any]:
    """Describe and verify an export directory, manifest, artifact or chain JSON.

    Args:
        path: an export directory, its ``manifest.json``, ``chain.ts``/``.onnx``/``.pt2``, or
            a chain JSON written by :meth:`nchains.Chain.save`.

    Returns:
        dict with ``kind`` ("export", "artifact" or "chain"), ``metadata`` (the export
        metadata, or the chain), ``checks`` (one entry per artifact: ``status`` and ``ok``)
        and ``ok`` (False when any artifact is missing, unreadable or tampered).

    Raises:
        ValueError: when ``path`` does not exist or is none of the above, or when its manifest
            names an artifact by anything but a plain file name inside its folder (``../x``, an
            absolute path, a symlink leaving the folder): such a file is never read or hashed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"path {path!r} does not exist")
    from nchains.export.folder import manifest_artifacts

    kind = _kind(path)
    if kind == "json":
        data = _load_json(path)
        if isinstance(data, dict) and data.get("format") == "nchains.chain":
            from nchains.neurochains.chain import Chain

            try:  # a malformed chain is bad input (one-line error), not a failed verification
                Chain.from_dict(data)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            return {"kind": "chain", "path": path, "metadata": data, "checks": [], "ok": True}
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"path {path!r} is neither an nchains export manifest nor a chain JSON")
        folder = os.path.dirname(os.path.abspath(path))
        manifest_artifacts(data, folder)  # every entry checked before any file is read
        checks = [_check_artifact(folder, fmt, entry, data) for fmt, entry in data.get("artifacts", {}).items()]
        return {"kind": "export", "path": path, "metadata": data, "checks": checks,
                "ok": all(c["ok"] for c in checks)}
    folder = os.path.dirname(os.path.abspath(path))
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        try:
            meta = read_embedded(path, kind)
        except ValueError as exc:
            return {"kind": "artifact", "path": path, "metadata": {}, "ok": False,
                    "checks": [{"format": kind, "file": path, "status": f"unreadable: {exc}", "ok": False}]}
        return {"kind": "artifact", "path": path, "metadata": meta, "ok": True,
                "checks": [{"format": kind, "file": path, "ok": True,
                            "status": f"unverified: no {MANIFEST} beside the file"}]}
    manifest = _load_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ValueError(f"path {manifest_path!r} is not an nchains export manifest (not a JSON object)")
    listed = manifest_artifacts(manifest, folder)
    entry = next((manifest["artifacts"][f] for f, p in listed.items() if os.path.basename(p) == os.path.basename(path)),
                 None)
    if entry is None:
        check = {"format": kind, "file": path, "ok": False, "status": f"not listed in {manifest_path}"}
    else:
        check = _check_artifact(folder, kind, entry, manifest)
    try:
        meta = read_embedded(path, kind)
    except ValueError:
        meta = _strip(manifest)
    return {"kind": "artifact", "path": path, "metadata": meta, "checks": [check], "ok": check["ok"]}


# ---- text -----------------------------------------------------------------------------------


def _fmt_count(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _layer_rows(meta: Dict[str, Any]) -> List[Tuple[str, ...]]:
    rows = [("layer", "module", "kept", "computed", "region")]
    for name, info in meta.get("layers", {}).items():
        region = "-" if info.get("region") is None else ("kept" if info.get("region_kept") else "removed")
        rows.append((info.get("label", name), name, f"{len(info.get('kept', []))}/{info.get('total', '?')}",
                     str(len(info.get("computed", []))), region))
    return rows


def _table(rows: List[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _chain_region(chain_meta: Dict[str, Any], class_names=None) -> Optional[Dict[str, Any]]:
    """The region of a chain (or an older manifest's chain entry) from its ``classes``."""
    from nchains.models.class_names import chain_region

    classes = chain_meta.get("classes") if isinstance(chain_meta, dict) else None
    if not isinstance(classes, list) or not all(isinstance(c, int) for c in classes):
        return None
    names = class_names if class_names is not None else chain_meta.get("class_names")
    return chain_region(classes, names if isinstance(names, list) else None)


def _region_line(region: Optional[Dict[str, Any]]) -> str:
    if not isinstance(region, dict):
        return "region: unknown (the classes the chain was extracted for are not recorded)"
    return f"region: {region.get('note', '')}"


def _macs_line(c: Dict[str, Any]) -> str:
    # manifests of earlier versions called the multiply-accumulates "flops": read either
    key = "macs" if "macs" in c or "flops" not in c else "flops"
    ratio = c.get(f"{key}_ratio")
    return (f"MACs {_fmt_count(c.get(key))} (multiply-accumulates; original {_fmt_count(c.get(f'original_{key}'))}, "
            f"ratio {ratio if ratio is not None else float('nan'):.4f}, speed-up bound "
            f"{1 / ratio if ratio else float('inf'):.1f}x)")


def _runtime_line(fmt: str, entry: Optional[Dict[str, Any]]) -> str:
    """Which runtime loads the artifact: the manifest's words, else this version's (older manifests)."""
    known = RUNTIMES.get(fmt, {})
    entry = entry if isinstance(entry, dict) else {}
    runtime, load = entry.get("runtime", known.get("runtime", "?")), entry.get("load", known.get("load", "?"))
    return f"runtime: {runtime}; load: {load}"


def format_report(report: Dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_artifact`'s result."""
    meta = report["metadata"]
    lines = [f"{report['path']}: {report['kind']}"]
    if report["kind"] == "chain":
        kept = meta.get("kept", {})
        sizes = meta.get("layer_sizes", {})
        lines.append(f"chain of model {str(meta.get('model_hash', ''))[:12]}…: "
                     f"{sum(len(v) for v in kept.values())}/{sum(sizes.values())} filters, "
                     f"{sum(1 for v in kept.values() if v)}/{len(kept)} layers")
        if meta.get("class_names"):
            lines.append("class names: " + ", ".join(map(str, meta["class_names"])))
        lines.append(_region_line(meta.get("region") or _chain_region(meta)))
        lines.append("verification: not an exported artifact (export it with `nchains export`)")
        return "\n".join(lines)
    if meta:
        c = meta.get("compact", {})
        lines += _table(_layer_rows(meta))
        layers = meta.get("layers", {})
        lines.append("")
        lines.append(f"filters kept {sum(len(v.get('kept', [])) for v in layers.values())}/"
                     f"{sum(v.get('total', 0) for v in layers.values())}, computed "
                     f"{sum(len(v.get('computed', [])) for v in layers.values())}; layers kept "
                     f"{sum(1 for v in layers.values() if v.get('kept'))}/{len(layers)}")
        lines.append(f"parameters {_fmt_count(c.get('params'))} (original {_fmt_count(c.get('original_params'))}, "
                     f"ratio {c.get('params_ratio', float('nan')):.4f})")
        lines.append(_macs_line(c))
        inp = meta.get("input", {})
        lines.append(f"input [N, {', '.join(map(str, inp.get('shape', [])))}] {inp.get('dtype', '')}, "
                     f"preprocessing: {json.dumps(inp.get('preprocessing'))}")
        names = meta.get("class_names")
        lines.append("class names: " + (", ".join(map(str, names)) if names else "(none)"))
        lines.append(_region_line(meta.get("region") or _chain_region(meta.get("chain", {}), names)))
        for fmt, v in meta.get("verification", {}).get("formats", {}).items():
            lines.append(f"export check {fmt}: max |diff| {v['max_abs_diff']:.3g} "
                         f"(relative {v['relative']:.3g}), argmax agreement {v['argmax_agree']}/{v['rows']}")
    artifacts = meta.get("artifacts") if isinstance(meta, dict) else None  # an export's manifest lists them
    for check in report["checks"]:
        lines.append(f"{check['format']}: {check['status']}  ({check['file']})")
        lines.append(f"  {_runtime_line(check['format'], (artifacts or {}).get(check['format']))}")
    lines.append("status: " + ("OK" if report["ok"] else "FAILED (tampered, missing or unreadable artifact)"))
    return "\n".join(lines)
