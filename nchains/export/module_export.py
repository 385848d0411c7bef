"""Exporting any plain ``nn.Module`` (not a chain) through the same verified formats.

:func:`export_module` is the smallest entry point beside :func:`nchains.export` for models that
are not chains, e.g. a critical path's locally linear model: each requested format is traced on
the CPU, checked to hold no nchains op, serialized with the metadata embedded, loaded back from
its bytes and compared with the module itself on the given images and on random inputs
(max |diff| <= RTOL x max |output|, same argmax), and only then is the folder published, all
or nothing (:class:`nchains._util.publish.StagedFolder`), with the layout of a chain export
(``chain.<ext>`` files and ``manifest.json``, format ``nchains.export``, ``kind: "module"``),
so ``nchains inspect`` reads it.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from nchains._util.device import full_precision, model_device_dtype
from nchains._util.publish import StagedFolder, check_destination
from nchains._util.tensors import check_images
from nchains.export.artifacts import EXPORT_FORMAT
from nchains.export.exporter import RTOL, _compare, _formats, _progress, _publish, format_failures
from nchains.export.folder import replace_problem
from nchains.export.formats import _EXPORTERS, _INPUT, _OUTPUT, ExportError
from nchains.export.manifest import VERSION, dumps, with_artifacts

__all__ = ["export_module"]


def _inputs(images: Optional[torch.Tensor], shape, n_random: int, dtype) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sets = {} if images is None else {"images": images.detach().to("cpu", dtype)}
    sets["random"] = torch.randn(n_random, *shape, generator=gen, dtype=dtype)
    sets["random_batch1"] = sets["random"][:1].clone()
    return sets


def _metadata(metadata, shape, dtype, n_out: int) -> Dict[str, Any]:
    from nchains import __version__

    meta = {"format": EXPORT_FORMAT, "version": VERSION, "kind": "module", "nchains_version": __version__,
            "torch_version": torch.__version__,
            "input": {"name": _INPUT, "shape": list(shape), "batch": "dynamic",
                      "dtype": str(dtype).replace("torch.", "")},
            "output": {"name": _OUTPUT, "shape": ["batch", n_out], "meaning": "the module's output"}}
    reserved = sorted(set(metadata) & (set(meta) | {"verification", "artifacts"}))
    if reserved:
        raise ValueError(f"metadata must not set the reserved key {reserved[0]!r}")
    meta.update(metadata)
    return meta


def _verified_blobs(module: nn.Module, fmts, inputs, refs, meta, bar) -> Dict[str, bytes]:
    example = inputs["random"][:2]
    programs, checks = {}, {}
    for fmt in fmts:
        exporter = _EXPORTERS[fmt]
        with format_failures(fmt):
            programs[fmt], how = exporter.prepare(module, example)
            exporter.plain(programs[fmt])
            run = exporter.load(exporter.serialize(programs[fmt], dumps(meta)))
        checks[fmt] = {**_compare(fmt, run, inputs, refs), "exporter": how}
        if not checks[fmt]["passed"]:
            raise ExportError(f"{fmt} export failed verification against the module: {checks[fmt]['failure']}; "
                              "nothing was written")
        if bar is not None:
            bar.update(1)
    meta["verification"] = {"rule": f"max |diff| <= {RTOL:g} x max |output| and the same argmax, against the module",
                            "formats": checks}
    blobs = {}
    for fmt in fmts:
        blobs[fmt] = _EXPORTERS[fmt].serialize(programs[fmt], dumps(meta))
        again = _compare(fmt, _EXPORTERS[fmt].load(blobs[fmt]), inputs, refs)
        if not again["passed"]:
            raise ExportError(f"{fmt} artifact changed when re-saved with its metadata: {again['failure']}")
        if bar is not None:
            bar.update(1)
    return blobs


def export_module(module: nn.Module, out_dir, example: torch.Tensor, formats="onnx,pt2", *,
                  images: Optional[torch.Tensor] = None, metadata: Optional[Dict[str, Any]] = None,
                  n_random: int = 8, progress: bool = False) -> Dict[str, Any]:
    """Export ``module`` (Tensor[N, C, H, W] -> Tensor[N, K]), verified, all or nothing.

    Args:
        module (nn.Module): traceable by the requested exporters; used in eval mode, on a CPU copy
            when it lives on an accelerator (the artifacts are CPU artifacts).
        out_dir (path): a new folder, an empty one or an earlier nchains export (replaced as a whole).
        example (Tensor[N, C, H, W]): gives the input shape and dtype (batch stays dynamic).
        formats (str or sequence): as :func:`nchains.export` (``ts``, ``onnx``, ``pt2``, ``aoti``).
        images (Tensor[M, C, H, W]): real inputs to verify on, besides ``n_random`` random ones.
        metadata (dict): JSON-able, merged into the manifest and every artifact's embedded metadata.
        n_random (int): random standard-normal verification inputs (>= 2).
        progress (bool): a progress bar over the formats.

    Returns:
        dict: the manifest written to ``out_dir/manifest.json``.

    Raises:
        TypeError, ValueError: bad arguments or destination (before any work); ExportError when a
            format fails or does not match the module (nothing is written then).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    example = check_images(example, name="example")
    fmts = _formats(formats)
    shape = tuple(example.shape[1:])
    images = None if images is None else check_images(images, shape)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 2:
        raise ValueError(f"n_random must be an int >= 2, got {n_random!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    out_dir = os.fspath(out_dir)
    check_destination(out_dir, replace_problem)
    device, dtype = model_device_dtype(module)
    module.eval()
    with StagedFolder(out_dir, replace_problem) as staging:
        cpu = module if device.type == "cpu" else copy.deepcopy(module).to("cpu")
        inputs = _inputs(images, shape, n_random, dtype)
        with full_precision(), torch.no_grad():
            refs = {name: cpu(x) for name, x in inputs.items()}
        meta = _metadata(metadata or {}, shape, dtype, refs["random"].shape[1])
        meta["verification_inputs"] = {name: len(x) for name, x in inputs.items()}
        with _progress(progress, 2 * len(fmts)) as bar:
            blobs = _verified_blobs(cpu, fmts, inputs, refs, meta, bar)
        manifest = with_artifacts(meta, blobs)
        _publish(staging, blobs, manifest)
    return manifest
