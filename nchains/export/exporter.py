"""Exporting a chain as a verified, standalone model: TorchScript, ONNX and torch.export.

:func:`export` builds the compact model (:func:`nchains.compact.compact`), exports it to each
requested format, re-loads every artifact from its serialized bytes and compares it with the
masked model ``chain.apply(model)`` on the chain's images and on random inputs, at several
batch sizes. Only when every format passes is anything written: ``chain.ts``, ``chain.onnx``,
``chain.pt2`` and ``manifest.json`` go into a staging folder beside the destination, which then
replaces it in one atomic step (:mod:`nchains._util.publish`), so the destination always holds
one complete export. The same metadata (chain summary, kept
filters, class names, input and preprocessing, weights hash, verification figures) is embedded
in every artifact: TorchScript, pt2 and AOTInductor extra file ``nchains.json``, ONNX
``metadata_props``. The per-format code is in :mod:`nchains.export.formats`.
The artifacts hold plain ATen/ONNX ops only and load without nchains installed.

Example:
    >>> manifest = export(chain, model, "out/", images=images)
    >>> import onnxruntime; onnxruntime.InferenceSession("out/chain.onnx")
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from nchains._util.device import full_precision, model_device_dtype
from nchains._util.io import PathLike, hash_tensor
from nchains._util.publish import StagedFolder, check_destination
from nchains._util.tensors import check_images
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.neurochains.chain import Chain
from nchains.compact.walk import compact
from nchains.export.artifacts import FILES, MANIFEST, model_stats
from nchains.export.folder import replace_problem
# the per-format code lives in .formats; _EXPORTERS is re-exported as the same dict (tests patch it)
from nchains.export.formats import _EXPORTERS, FORMATS, ExportError
from nchains.export.manifest import (VERSION, build_metadata, default_preprocessing, dumps,  # noqa: F401 - VERSION
                                     export_stats, with_artifacts)

__all__ = ["export", "ExportError", "FORMATS", "RTOL"]

#: An artifact passes when max |logit difference| <= RTOL * max |reference logit| on every input set.
RTOL = 1e-4
# ---- verification ----------------------------------------------------------------------------

def _compare(fmt: str, run: Callable, inputs: Dict[str, torch.Tensor], refs: Dict[str, torch.Tensor]
             ) -> Dict[str, Any]:
    """Figures of ``run`` against the reference logits on every input set; ``passed`` per the rule
    max |diff| <= RTOL * max |logit| and the same argmax (rows whose two best reference logits
    are closer than that tolerance are ties: either answer is right)."""
    worst = {"max_abs_diff": 0.0, "max_abs_logit": 0.0, "relative": 0.0, "argmax_agree": 0, "rows": 0,
             "ties": 0, "batch_sizes": [], "passed": True, "failure": None}
    for name, x in inputs.items():
        ref = refs[name]
        with torch.no_grad():
            out = run(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            worst.update(passed=False, failure=f"output shape {shape} on {name} != {tuple(ref.shape)}")
            return worst
        out, ref = out.double(), ref.double()
        scale = float(ref.abs().max())
        diff = float((out - ref).abs().max())
        rel = diff / scale if scale > 0 else diff
        top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
        tie = (top2[:, 0] - top2[:, -1] <= RTOL * scale) if ref.shape[1] > 1 else \
            torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
        agree = (out.argmax(1) == ref.argmax(1)) | tie
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["max_abs_logit"] = max(worst["max_abs_logit"], scale)
        worst["relative"] = max(worst["relative"], rel)
        worst["argmax_agree"] += int(agree.sum())
        worst["rows"] += len(ref)
        worst["ties"] += int(tie.sum())
        worst["batch_sizes"].append(len(x))
        if worst["passed"] and not (rel <= RTOL and bool(agree.all())):
            why = (f"max |diff| {diff:.3g} > {RTOL:g} x max |logit| {scale:.3g}" if rel > RTOL
                   else f"argmax differs on {int((~agree).sum())} of {len(ref)} inputs")
            worst.update(passed=False, failure=f"{why} on the {name} inputs")
    return worst


def _inputs(chain: Chain, images: Optional[torch.Tensor], n_random: int, dtype: torch.dtype,
            images_note: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    shape = tuple(chain.input_shape)
    sets: Dict[str, torch.Tensor] = {}
    info: Dict[str, Any] = {} if images_note is None else {"images_note": images_note}
    if images is not None:
        sets["images"] = images.detach().to("cpu", dtype)  # moved to the model's device where it runs
        h = hash_tensor(images)
        info["images"] = {"count": len(images), "sha256": h, "chain_images": h == chain.images_hash}
    sets["random"] = torch.randn(n_random, *shape, generator=gen, dtype=dtype)
    sets["random_batch1"] = sets["random"][:1].clone()
    info["random"] = {"count": n_random, "distribution": "standard normal", "seed": 0}
    return sets, info


def _check_images(images, chain: Chain) -> Optional[torch.Tensor]:
    return None if images is None else check_images(images, chain.input_shape)


def _formats(formats) -> Tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    if not isinstance(formats, (list, tuple)) or not formats:
        raise ValueError(f"formats must name at least one of torchscript (ts), onnx, pt2, aoti, got {formats!r}")
    out = []
    for f in formats:
        key = FORMATS.get(str(f).strip().lower()) if isinstance(f, str) else None
        if key is None:
            raise ValueError(f"formats: unknown format {f!r}; accepted: torchscript (ts), onnx, pt2 (export), "
                             "aoti (aotinductor)")
        if key not in out:
            out.append(key)
    return tuple(out)


# ---- steps of export() -----------------------------------------------------------------------

def _validate(chain: Chain, model: nn.Module, out_dir: PathLike, formats, images, n_random: int,
              images_note: Optional[str], preprocessing) -> Tuple[str, Tuple[str, ...], Optional[torch.Tensor]]:
    """Checks every argument of :func:`export` before any work: (out_dir, formats, images)."""
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be an nchains.Chain, got {type(chain).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    fmts = _formats(formats)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 2:
        raise ValueError(f"n_random must be an int >= 2, got {n_random!r}")
    if images_note is not None and not isinstance(images_note, str):
        raise TypeError(f"images_note must be a str or None, got {type(images_note).__name__}")
    if preprocessing is not None and not isinstance(preprocessing, (dict, str)):
        raise TypeError(f"preprocessing must be a dict, a str or None, got {type(preprocessing).__name__}")
    images = _check_images(images, chain)
    check_destination(out_dir, replace_problem)  # a file or a foreign folder; writability: StagedFolder
    return out_dir, fmts, images


@dataclass
class _References:
    """What every artifact is compared with: the masked model's logits on each input set, on
    the CPU where the artifacts run (computed there by a CPU copy of the masked model when the
    model lives on an accelerator)."""
    gm: fx.GraphModule  # the default compact graph, on the model's device (its layers go in the metadata)
    inputs: Dict[str, torch.Tensor]  # CPU
    input_info: Dict[str, Any]
    refs: Dict[str, torch.Tensor]  # CPU
    names: Optional[Sequence[str]]
    dtype: torch.dtype
    graph: ModelGraph  # the one analysis every compact graph is built from
    compact_check: Dict[str, Any]  # the default compact graph against the masked model, on the model's device
    masked: nn.Module  # chain.apply(model), on the model's device: every compact graph's self-check reference

    @property
    def n_out(self) -> int:
        return self.refs["random"].shape[1]


def _references(chain: Chain, model: nn.Module, images: Optional[torch.Tensor], n_random: int,
                images_note: Optional[str], class_names, keep_scores: bool,
                graph: Optional[ModelGraph] = None) -> _References:
    """The one analysis of ``model``, reference logits of ``chain.apply(model)``, and the default
    compact model checked against them on the model's device (like with like)."""
    device, dtype = model_device_dtype(model)
    graph = graph_for(model, chain.input_shape, graph)
    inputs, input_info = _inputs(chain, images, n_random, dtype, images_note)
    on_device = {name: x.to(device) for name, x in inputs.items()}
    masked = chain.apply(model, graph=graph)
    gm = compact(chain, model, keep_scores=keep_scores, graph=graph, masked=masked)
    with full_precision(), torch.no_grad():  # exact float32 on GPUs too (no TF32 convs)
        refs = {name: masked(x) for name, x in on_device.items()}
        check = _compare("compact", gm, on_device, refs)
    n_out = refs["random"].shape[1]
    names = list(class_names) if class_names is not None else chain.class_names
    if names is not None and len(names) != n_out:
        raise ValueError(f"class_names must have {n_out} entries (one per logit), got {len(names)}")
    if not check["passed"]:
        raise ExportError(f"the compact model does not match the masked model: {check['failure']}; "
                          "nothing was written (please report this as a bug)")
    if device.type != "cpu":  # the artifacts are CPU artifacts: their reference runs there too
        on_cpu = copy.deepcopy(masked).to("cpu")
        with torch.no_grad():
            refs = {name: on_cpu(x) for name, x in inputs.items()}
    return _References(gm, inputs, input_info, refs, names, dtype, graph, check, masked)


@contextlib.contextmanager
def format_failures(fmt: str):
    """Any exporter failure inside the block becomes an ExportError naming ``fmt`` (ExportErrors pass)."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any exporter failure names the format
        text = str(exc).strip().splitlines()
        raise ExportError(f"{fmt} export failed: {type(exc).__name__}: {text[0] if text else ''}; "
                          "nothing was written") from exc


def _verify_formats(chain: Chain, model: nn.Module, fmts: Sequence[str], ref: _References, meta: Dict[str, Any],
                    keep_scores: bool, bar) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """Exports, re-loads and compares each format: (programs, verification figures per format)."""
    checks = {"compact": ref.compact_check}
    example = ref.inputs["random"][:2]
    graphs: Dict[Tuple[Any, ...], fx.GraphModule] = {}  # one compact graph per set of options
    programs: Dict[str, Any] = {}
    for fmt in fmts:
        exporter = _EXPORTERS[fmt]
        with format_failures(fmt):
            options = exporter.compact_options()
            key = tuple(options.items())
            if key not in graphs:
                # the exporters trace and serialize on the CPU (an accelerator model's compact graph moves)
                graphs[key] = compact(chain, model, keep_scores=keep_scores, graph=ref.graph, masked=ref.masked,
                                      **options).to("cpu")
            programs[fmt], how = exporter.prepare(graphs[key], example)
            exporter.plain(programs[fmt])
            run = exporter.load(exporter.serialize(programs[fmt], dumps(meta)))
        checks[fmt] = _compare(fmt, run, ref.inputs, ref.refs)
        checks[fmt]["exporter"] = how
        checks[fmt]["channel_multiple"] = exporter.channel_multiple
        checks[fmt]["max_pool"] = exporter.max_pool
        checks[fmt]["memory_format"] = graphs[key].nchains_memory_format
        checks[fmt].update(model_stats(graphs[key], chain.input_shape))  # params, macs: padding counts
        if not checks[fmt]["passed"]:
            raise ExportError(f"{fmt} export failed verification against the masked model: "
                              f"{checks[fmt]['failure']}; nothing was written")
        if bar is not None:
            bar.update(1)
    return programs, checks


def _final_blobs(fmts: Sequence[str], programs: Dict[str, Any], meta: Dict[str, Any], ref: _References,
                 bar) -> Dict[str, bytes]:
    """Each artifact's bytes with the final metadata (verification included), verified again."""
    final = dumps(meta)
    blobs: Dict[str, bytes] = {}
    for fmt in fmts:
        exporter = _EXPORTERS[fmt]
        blobs[fmt] = exporter.serialize(programs[fmt], final)
        again = _compare(fmt, exporter.load(blobs[fmt]), ref.inputs, ref.refs)
        if not again["passed"]:
            raise ExportError(f"{fmt} artifact changed when re-saved with its metadata: {again['failure']}; "
                              "nothing was written")
        if bar is not None:
            bar.update(1)
    return blobs


@contextlib.contextmanager
def _progress(show: bool, total: int):
    """A tqdm bar over the export steps, or None."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="export", leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _publish(staging: StagedFolder, blobs: Dict[str, bytes], manifest: Dict[str, Any]) -> None:
    """Writes every artifact and the manifest into the staging folder, then puts it in place."""
    for fmt, blob in blobs.items():
        staging.write(FILES[fmt], blob)
    staging.write(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    staging.publish()


# ---- entry point -----------------------------------------------------------------------------

def export(chain: Chain, model: nn.Module, out_dir: PathLike,
           formats: Union[str, Sequence[str]] = ("torchscript", "onnx", "pt2"), *,
           images: Optional[torch.Tensor] = None, keep_scores: bool = False,
           class_names: Optional[Sequence[str]] = None, preprocessing: Optional[Dict[str, Any]] = None,
           n_random: int = 8, progress: bool = False, images_note: Optional[str] = None,
           graph: Optional[ModelGraph] = None) -> Dict[str, Any]:
    """Export the chain's compact model, verified, with metadata, all or nothing.

    The model is analysed once (or ``graph`` reused): the masked model and every compact graph
    are built from that one :class:`~nchains.graph.analysis.ModelGraph`. A model on an
    accelerator is verified there (compact against masked); the artifacts are traced,
    serialized and verified on the CPU, against a CPU copy of the masked model.

    The whole set of files is built in a staging folder beside ``out_dir`` and published with
    one atomic rename or exchange (:mod:`nchains._util.publish`): at every instant ``out_dir``
    holds the previous complete export or the new one, never a mix, and never files of the
    previous export that the new one does not list. A run killed midway leaves a hidden
    ``.<name>.nchains-staging-…`` folder that the next export to ``out_dir`` removes.

    Args:
        chain (Chain): the chain to export.
        model (nn.Module): the chain's original model (weights must match ``chain.model_hash``).
        out_dir (path): folder for ``chain.ts``, ``chain.onnx``, ``chain.pt2`` and ``manifest.json``:
            a new folder (parents are created), an empty one, or an earlier export (replaced as
            a whole). A folder holding anything else is refused, never deleted.
        formats (str or sequence of str): any of ``torchscript`` (``ts``), ``onnx``, ``pt2``,
            ``aoti`` (AOTInductor package ``chain.aoti.pt2``, compiled with the C++ compiler: a
            minute or more, so not a default), as a sequence or a comma-separated string.
        images (Tensor[N, *chain.input_shape]): the chain's images, for verification (recorded
            as such when their hash matches ``chain.images_hash``); random inputs are always used.
        keep_scores (bool): see :func:`nchains.compact.compact`.
        class_names (sequence of str): names of the logits (default ``chain.class_names``).
        preprocessing (dict): how raw inputs become the model's input, recorded in the metadata
            (default: known for the shipped model, else None).
        n_random (int): random standard-normal inputs used for verification (>= 2).
        progress (bool): show a progress bar over the formats.
        images_note (str): where ``images`` come from, or why there are none (e.g. the chain's
            images could not be rebuilt), recorded as ``verification.inputs.images_note``.
        graph (ModelGraph): ``nchains.analyze(model, example)`` at ``chain.input_shape``, to
            reuse one analysis (checked to be this model's); default: analysed here, once.

    Returns:
        dict: the manifest written to ``out_dir/manifest.json`` (``artifacts`` gives each file,
        its SHA-256 and size; ``verification`` the figures per format).

    Raises:
        TypeError, ValueError: on bad arguments, or an ``out_dir`` that is a file, a foreign
            non-empty folder or not writable (checked before any work).
        ExportError (a ValueError): when a format cannot be exported or fails verification
            (max |diff| <= 1e-4 x max |logit| and the same argmax); nothing is written then.
    """
    out_dir, fmts, images = _validate(chain, model, out_dir, formats, images, n_random, images_note, preprocessing)
    chain.check_model(model)
    model.eval()
    with StagedFolder(out_dir, replace_problem) as staging:  # an unwritable out_dir fails before the work
        ref = _references(chain, model, images, n_random, images_note, class_names, keep_scores, graph)
        meta = build_metadata(chain, ref.gm, export_stats(chain, model, ref.gm), ref.names,
                              preprocessing if preprocessing is not None else default_preprocessing(chain),
                              keep_scores, ref.n_out, ref.dtype)
        with _progress(progress, 2 * len(fmts)) as bar:
            programs, checks = _verify_formats(chain, model, fmts, ref, meta, keep_scores, bar)
            meta["verification"] = {"rule": f"max |diff| <= {RTOL:g} x max |logit| and the same argmax, "
                                            "against chain.apply(model)", "inputs": ref.input_info,
                                    "formats": checks}
            blobs = _final_blobs(fmts, programs, meta, ref, bar)
        manifest = with_artifacts(meta, blobs)
        _publish(staging, blobs, manifest)
    return manifest
