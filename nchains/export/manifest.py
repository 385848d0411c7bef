"""The metadata of an export: what ``manifest.json`` holds and every artifact embeds.

:func:`build_metadata` describes the chain (summary, kept filters per layer, gates, classes),
the model (hash, spec), the input (shape, dtype, preprocessing) and the compact model's size;
:func:`export_stats` measures that size; :func:`with_artifacts` adds the file list that only
the manifest carries (an artifact cannot hold its own hash).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Mapping, Optional

import torch
from torch import fx, nn

from nchains.export.artifacts import EXPORT_FORMAT, FILES, RUNTIMES, model_stats
from nchains.export.formats import _INPUT, _OUTPUT
from nchains.models.class_names import chain_region
from nchains.neurochains.chain import Chain

__all__ = ["VERSION", "build_metadata", "default_preprocessing", "dumps", "export_stats", "with_artifacts"]

#: Version of the manifest layout.
VERSION = 1


def default_preprocessing(chain: Chain) -> Optional[Dict[str, Any]]:
    """What the chain's images went through (one function of its model spec and images source)."""
    from nchains.models.image_source import applied_preprocessing

    return applied_preprocessing(chain.model_spec, chain.images_source)


def export_stats(chain: Chain, model: nn.Module, gm: nn.Module) -> Dict[str, Any]:
    """Parameters, MACs (multiply-accumulates) and convs of the compact model ``gm`` and of the
    original ``model``, on one sample of ``chain.input_shape``."""
    original, small = model_stats(model, chain.input_shape), model_stats(gm, chain.input_shape)
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    return {"params": small["params"], "macs": small["macs"], "original_params": original["params"],
            "original_macs": original["macs"], "params_ratio": small["params"] / max(original["params"], 1),
            "macs_ratio": small["macs"] / max(original["macs"], 1), "convs_run": len(convs),
            "convs_total": len(chain.layer_sizes)}


def build_metadata(chain: Chain, gm: fx.GraphModule, stats: Dict[str, Any], class_names, preprocessing,
                   keep_scores: bool, n_out: int, dtype: torch.dtype) -> Dict[str, Any]:
    """The metadata embedded in every artifact (the manifest less ``artifacts``).

    Args:
        chain (Chain): the exported chain.
        gm (fx.GraphModule): its compact model (``nchains_layers``: the filters each layer computes).
        stats (dict): :func:`export_stats`.
        class_names (sequence of str or None): names of the ``n_out`` logits.
        preprocessing (dict, str or None): how raw inputs become the input tensor.
        keep_scores (bool): whether BatchNorm and scores stayed explicit ops.
        n_out (int): logits per sample.
        dtype (torch.dtype): the input's dtype.
    """
    from nchains import __version__

    region_of = {layer: r for r, info in chain.regions.items() for layer in info.get("layers", [])}
    layers = {}
    for name, size in chain.layer_sizes.items():
        region = region_of.get(name)
        layers[name] = {
            "label": chain.label(name), "total": size, "kept": list(chain.kept.get(name, [])),
            "scores": list(chain.scores.get(name, [])),
            "computed": list(gm.nchains_layers.get(name, {}).get("out", [])),
            "region": region, "region_kept": None if region is None else bool(chain.gates.get(region, 1)),
        }
    return {
        "format": EXPORT_FORMAT, "version": VERSION, "nchains_version": __version__,
        "torch_version": torch.__version__,
        "chain": {"metrics": chain.metrics, "config": chain.config, "seed": chain.seed, "family": chain.family,
                  "classes": chain.classes, "images_hash": chain.images_hash,
                  "images_source": chain.images_source, "gates": chain.gates,
                  "strongest_filters": chain.strongest_filters},
        "model_hash": chain.model_hash, "model_spec": chain.model_spec,
        "class_names": list(class_names) if class_names is not None else None,
        "region": chain_region(chain.classes, class_names),
        "input": {"name": _INPUT, "shape": list(chain.input_shape), "batch": "dynamic",
                  "dtype": str(dtype).replace("torch.", ""), "preprocessing": preprocessing},
        "output": {"name": _OUTPUT, "shape": ["batch", n_out], "meaning": "logits (no softmax)"},
        "layers": layers,
        "compact": {"keep_scores": keep_scores, **stats},
    }


def dumps(meta: Dict[str, Any]) -> str:
    """The metadata as the JSON text embedded in artifacts."""
    return json.dumps(meta, indent=1, sort_keys=False, allow_nan=True)


def with_artifacts(meta: Dict[str, Any], blobs: Mapping[str, bytes]) -> Dict[str, Any]:
    """The manifest: ``meta`` plus ``artifacts`` (per format: plain file name, SHA-256, bytes, and
    which runtime loads it, how)."""
    manifest = dict(meta)
    manifest["artifacts"] = {fmt: {"file": FILES[fmt], "sha256": hashlib.sha256(blob).hexdigest(),
                                   "bytes": len(blob), **RUNTIMES[fmt]} for fmt, blob in blobs.items()}
    return manifest
