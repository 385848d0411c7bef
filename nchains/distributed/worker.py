"""What one Ray task of a batch run does, in the worker process: one region -> one chain.

:func:`run_region` rebuilds the region's model (once per worker process: :func:`cached_model`)
and images from the region's small spec, extracts the chain with the region's seed and the
task's thread count, optionally exports it, and returns plain data for the driver to write:
the results row, the chain as a dict and the export's files as bytes (so a worker on another
node needs no shared filesystem). Process-wide state the task changes (torch's thread count,
the RNGs of torch, numpy and ``random``) is restored before it returns. A region whose code
raises comes back as a row with ``status: "failed"`` and the one-line error; a worker that dies
is Ray's to retry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["cached_model", "run_region", "process_state"]

_MODELS: Dict[str, nn.Module] = {}  # model spec (JSON) -> model, per worker process
_METRICS = ("filters_kept", "filters_total", "layers_kept", "layers_total", "kl", "agreement", "prob_drop")


def cached_model(spec: Dict[str, Any]) -> nn.Module:
    """The model of ``spec``, loaded once per process (extraction never modifies it)."""
    from nchains.models.spec import load_model

    key = json.dumps(spec, sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec)
    return _MODELS[key]


@contextlib.contextmanager
def process_state(seed: int, threads: Optional[int]) -> Iterator[None]:
    """Seeds torch, numpy and ``random`` with ``seed`` and sets torch's thread count, then puts
    all of them back: a worker runs many tasks, and none may see another's state."""
    old_threads = torch.get_num_threads()
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
        finally:
            torch.set_num_threads(old_threads)
            np.random.set_state(np_state)
            random.setstate(py_state)


def _region_inputs(region: Dict[str, Any], model: nn.Module, warn: Callable[[str], None]
                   ) -> Tuple[torch.Tensor, Optional[List[str]], Dict[str, Any]]:
    """(images, class names, the complete images source) of a region."""
    source = region["images"]
    if source["kind"] == "default":
        from nchains.models import zoo
        from nchains.models.image_source import images_from_source

        images, _ = images_from_source(source)
        return images, zoo.default_class_names(), source
    from nchains.cli._inputs import _folder_images  # the folder loading and class naming of `nchains extract`

    args = argparse.Namespace(images=source["path"], size=source.get("size"), preprocessing=source.get("preprocessing"),
                              classes=",".join(source["classes"]) if source.get("classes") else None,
                              per_class=source["per_class"], per_class_default=source["per_class"])
    images, class_names, _, full = _folder_images(args, region["model"], model, warn)
    return images, class_names, full


def _export_files(chain, model: nn.Module, images: torch.Tensor, class_names) -> Dict[str, bytes]:
    """The files of a verified export of ``chain``, built in a private temporary folder."""
    from nchains.export.exporter import export

    with tempfile.TemporaryDirectory(prefix="nchains-batch-") as tmp:
        out = os.path.join(tmp, "export")
        export(chain, model, out, images=images, class_names=class_names)
        files = {}
        for name in sorted(os.listdir(out)):
            with open(os.path.join(out, name), "rb") as f:
                files[name] = f.read()
    return files


def _row(region: Dict[str, Any], key: str) -> Dict[str, Any]:
    return {"key": key, "region": region["id"], "classes": region["classes"], "seed": region["seed"],
            "model": region["model"].get("name", region["model"]["kind"]), "status": "failed", "error": None,
            **{m: None for m in _METRICS}, "seconds": None, "chain": None, "export": None, "warnings": [],
            "pid": os.getpid()}


def run_region(region: Dict[str, Any], key: str, config: Dict[str, Any], export: bool = False,
               threads: Optional[int] = 1, on_start: Optional[Callable[[Dict[str, Any]], None]] = None
               ) -> Dict[str, Any]:
    """Extracts (and optionally exports) the chain of one region.

    Args:
        region (dict): see :mod:`nchains.distributed.regions`.
        key (str): the region's key in ``results.jsonl`` (recorded in the row).
        config (dict): ``NeuroChainsConfig.to_dict()``; its seed is replaced by the region's.
        export (bool): also export the chain (TorchScript, ONNX, pt2; verified).
        threads (int): torch threads for this task (restored afterwards); None leaves it.
        on_start (callable): ``on_start(region)`` called first, in the worker (a test hook).

    Returns:
        dict: ``row`` (the results row; ``status`` ``"ok"`` or ``"failed"`` with ``error``,
        prefixed ``export:`` when only the export failed), ``chain`` (``Chain.to_dict()``, or
        None when the extraction failed) and ``export`` (file name -> bytes, or None).
    """
    from nchains.cli.main import one_line
    from nchains.neurochains.config import NeuroChainsConfig
    from nchains.neurochains.extraction import extract

    if on_start is not None:
        on_start(region)
    row, started = _row(region, key), time.perf_counter()
    out: Dict[str, Any] = {"row": row, "chain": None, "export": None}
    try:
        cfg = NeuroChainsConfig.from_dict(config).replace(seed=region["seed"])
        with process_state(region["seed"], threads):
            model = cached_model(region["model"])
            images, class_names, source = _region_inputs(region, model, row["warnings"].append)
            chain = extract(model, images, cfg, class_names=class_names, progress=False, model_spec=region["model"])
            chain.images_source = source
            row.update({m: chain.metrics.get(m) for m in _METRICS})
            out["chain"] = chain.to_dict()  # kept even when the export below fails
            if export:
                out["export"] = _export_files(chain, model, images, class_names)
    except Exception as exc:  # noqa: BLE001 - a region that fails is recorded; the batch goes on
        where = "export: " if out["chain"] is not None else ""
        row["error"] = f"{where}{type(exc).__name__}: {one_line(exc)}"
        row["seconds"] = round(time.perf_counter() - started, 3)
        return out
    row.update(status="ok", seconds=round(time.perf_counter() - started, 3))
    return out
