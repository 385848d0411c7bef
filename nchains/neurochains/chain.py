"""The Chain artifact: which filters and regions of a CNN survive, with scores and metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from nchains._util.io import PathLike, hash_model, write_atomic
from nchains.neurochains.chain_schema import check_against_graph, validate_chain

FORMAT = "nchains.chain"
#: Version written by :meth:`Chain.save`. Version 2 added ``images_source``; version 3 renamed
#: ``paths`` to ``strongest_filters`` (the strongest filter of each layer taken on its own, not a
#: path). Loading rejects unknown fields, so an older nchains must see a new version rather than
#: a "malformed" file.
VERSION = 3
#: Versions :meth:`Chain.load` reads (version 1 files have no ``images_source``: None; versions 1
#: and 2 store ``strongest_filters`` as ``paths``).
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class Chain:
    """A local inference chain extracted by :func:`nchains.extract`.

    Attributes:
        kept (dict layer -> list[int]): kept filter indices per scored layer (module path);
            an empty list means the layer is removed.
        scores (dict layer -> list[float]): scores of the kept filters, aligned with ``kept``.
        gates (dict region -> int): 1 keeps the region, 0 replaces it by the identity.
        config (dict): the resolved :class:`~nchains.config.NeuroChainsConfig`.
        seed (int): the extraction seed.
        model_hash (str): SHA-256 of the model's state_dict.
        images_hash (str): SHA-256 of the images.
        metrics (dict): ``filters_kept``, ``filters_total``, ``layers_kept``, ``layers_total``,
            ``kl``, ``agreement``, ``prob_drop`` (and more), measured on the final chain.
        layer_sizes (dict layer -> int): filters per layer in the original model.
        labels (dict name -> str): the papers' labels of layers and regions (``L4B1C2``).
        regions (dict region -> dict): ``kind`` ("block"/"layer") and the ``layers`` inside.
        input_shape (list[int]): ``[C, H, W]`` of the images.
        family (str): "resnet", "vgg" or "other" (picks the paper's lambdas).
        classes (list[int]): classes the original model predicts on the images.
        class_names (list[str] or None): names of all model outputs.
        strongest_filters (dict class -> list[[layer, filter, contribution]]): for each class
            (key: the class index as a string) and each kept layer in graph order, the kept
            filter with the largest Taylor contribution ``sum |a * dy_c/da|`` over that class's
            images. Each layer is ranked on its own: consecutive entries need not be connected,
            so this is not a path through the network. (Called ``paths`` before version 3; the
            deprecated read-only :attr:`paths` still returns it.)
        history (dict): loss per step of the scoring and fine-tuning phases.
        model_spec (dict or None): how to rebuild the model (used by the CLI).
        images_source (dict or None): how the images were chosen, enough to rebuild the exact
            tensor whose hash is ``images_hash``; set by ``nchains extract`` and used by
            ``nchains export``, None for chains extracted from Python on arbitrary tensors (and
            for version-1 files). ``{"kind": "default", "classes", "per_class", "seed",
            "confident"}``: the arguments of :func:`nchains.zoo.default_images`;
            ``{"kind": "folder", "path", "size", "preprocessing", "grayscale", "classes",
            "per_class"}``: an image folder (absolute path) loaded with
            :func:`nchains.data.load_image_folder`, keeping the first ``per_class`` images of each
            class sub-folder in ``classes`` (all when None).
    """

    kept: Dict[str, List[int]]
    scores: Dict[str, List[float]]
    gates: Dict[str, int]
    config: Dict[str, Any]
    seed: int
    model_hash: str
    images_hash: str
    metrics: Dict[str, Any]
    layer_sizes: Dict[str, int]
    labels: Dict[str, str] = field(default_factory=dict)
    regions: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    input_shape: List[int] = field(default_factory=list)
    family: str = "other"
    classes: List[int] = field(default_factory=list)
    class_names: Optional[List[str]] = None
    strongest_filters: Dict[str, List[List[Any]]] = field(default_factory=dict)
    history: Dict[str, List[float]] = field(default_factory=dict)
    model_spec: Optional[Dict[str, Any]] = None
    images_source: Optional[Dict[str, Any]] = None

    # ---- persistence --------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path: PathLike) -> None:
        """Writes the chain as versioned JSON, atomically; ValueError (naming the field) when the
        chain is not valid (:meth:`validate`), before anything is written."""
        self.validate()
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def validate(self) -> None:
        """Checks every field (types, lengths, index ranges, sorted unique kept indices, finite
        scores and metrics, known layer and region names, hashes, config): see
        :mod:`nchains.neurochains.chain_schema`. Called by :meth:`save`, :meth:`check_model`
        (so by :meth:`apply`, :func:`nchains.compact` and :func:`nchains.export`) and
        :meth:`from_dict`.

        Raises:
            ValueError: ``malformed chain: <field path>: <what is wrong>``.
        """
        try:
            validate_chain(asdict(self))
        except ValueError as exc:
            raise ValueError(f"malformed chain: {exc}") from None

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Chain":
        """The chain of :meth:`to_dict`'s output (any of :data:`READABLE_VERSIONS`), validated
        field by field; ValueError naming the first invalid field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an nchains chain (expected format {FORMAT!r})")
        version = data.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(f"chain version {version!r} is not supported (this nchains reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))})")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        known = {f.name for f in dataclasses.fields(cls)}
        if version < 3:  # versions 1 and 2 call strongest_filters "paths"
            known = (known - {"strongest_filters"}) | {"paths"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"malformed chain: unknown field(s) {unknown} for version {version} "
                             f"(accepted: {sorted(known)})")
        if "paths" in fields:
            fields["strongest_filters"] = fields.pop("paths")
        try:
            validate_chain(fields)
        except ValueError as exc:
            raise ValueError(f"malformed chain: {exc}") from None
        return cls(**fields)

    @classmethod
    def load(cls, path: PathLike) -> "Chain":
        """Reads a chain written by :meth:`save`; ValueError on a file that is not one."""
        if not os.path.isfile(path):
            raise ValueError(f"path {os.fspath(path)!r} does not exist or is not a file")
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"path {os.fspath(path)!r} is not a chain JSON file: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None

    # ---- model -------------------------------------------------------------------------

    def full_scores(self) -> Dict[str, torch.Tensor]:
        """Score vector per layer: the kept scores at their indices, 0 elsewhere."""
        out = {}
        for name, size in self.layer_sizes.items():
            s = torch.zeros(size, dtype=torch.float64)
            idx = self.kept.get(name, [])
            if idx:
                s[torch.as_tensor(idx)] = torch.as_tensor(self.scores[name], dtype=torch.float64)
            out[name] = s
        return out

    def check_model(self, model: nn.Module) -> None:
        """ValueError unless the chain is valid (:meth:`validate`) and ``model``'s weights hash
        to the chain's ``model_hash``."""
        self.validate()
        got = hash_model(model)
        if got != self.model_hash:
            raise ValueError(f"model weights hash {got[:12]}… differs from the chain's {self.model_hash[:12]}…: "
                             "the chain was extracted from another model")

    def check_graph(self, graph) -> None:
        """ValueError naming the first layer or region where the chain and ``graph`` (the
        model's :func:`nchains.analyze` at :attr:`input_shape`) disagree: names, widths, kinds."""
        check_against_graph(self.layer_sizes, self.regions, graph, bool(self.config.get("score_linear", False)))

    def apply(self, model: nn.Module, graph=None) -> nn.Module:
        """The masked model: ``model`` with the chain's scores and gates (removed filters output
        zero maps, removed regions are the identity). Same outputs as the extracted chain.

        Args:
            model (nn.Module): the original model (weights must match ``model_hash``), on any
                device, in any float dtype: the masked model lives there too.
            graph (ModelGraph): ``nchains.analyze(model, example)`` on inputs of the chain's
                :attr:`input_shape`, to reuse one analysis (default: analysed here).

        Returns:
            nn.Module in eval mode mapping Tensor[N, *input_shape] to logits.
        """
        from nchains._util.device import full_precision, model_device_dtype
        from nchains.graph.analysis import graph_for
        from nchains.instrument.scored_model import ScoredModel

        self.check_model(model)
        device, dtype = model_device_dtype(model)
        graph = graph_for(model, self.input_shape, graph)
        self.check_graph(graph)
        with full_precision():  # the scored model's self-check compares exact computations
            sm = ScoredModel(graph, score_linear=bool(self.config.get("score_linear", False)),
                             temperature=float(self.config.get("temperature", 0.2)))
        sm.set_hard({k: v.to(device=device, dtype=dtype) for k, v in self.full_scores().items()}, dict(self.gates))
        return sm.eval()

    # ---- reading -----------------------------------------------------------------------

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def filter_label(self, layer: str, index: int) -> str:
        return f"{self.label(layer)}_{index}"

    def filters(self) -> set:
        """The set of kept ``(layer, filter index)`` pairs."""
        return {(layer, i) for layer, idx in self.kept.items() for i in idx}

    def summary(self) -> str:
        """A table per layer: label, module path, filters kept / total, gate, mean score."""
        rows = [("layer", "module", "kept", "gate", "mean score")]
        region_of = {layer: r for r, info in self.regions.items() for layer in info.get("layers", [])}
        for name, size in self.layer_sizes.items():
            idx = self.kept.get(name, [])
            region = region_of.get(name)
            gate = "-" if region is None else ("kept" if self.gates.get(region, 1) else "removed")
            mean = f"{sum(self.scores[name]) / len(idx):.3f}" if idx else "-"
            rows.append((self.label(name), name, f"{len(idx)}/{size}", gate, mean))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        m = self.metrics
        lines.append("")
        lines.append(f"filters kept {m.get('filters_kept')}/{m.get('filters_total')}  "
                     f"layers kept {m.get('layers_kept')}/{m.get('layers_total')}  "
                     f"regions kept {m.get('regions_kept')}/{m.get('regions_total')}  "
                     f"KL {m.get('kl', float('nan')):.4f}  agreement {m.get('agreement', float('nan')):.3f}  "
                     f"prob drop {m.get('prob_drop', float('nan')):.4f}")
        return "\n".join(lines)

    def class_name(self, c: int) -> str:
        if self.class_names and 0 <= int(c) < len(self.class_names):
            return self.class_names[int(c)]
        return str(c)

    def describe(self) -> str:
        """The paper-style inference chain: per class, the strongest kept filter of every kept
        layer in graph order (:attr:`strongest_filters`; each layer ranked on its own), e.g.
        ``sneaker: Conv1_3 → L1B1C1_7 → … → L4B2C2_48``."""
        m = self.metrics
        head = (f"Inference chain: {m.get('filters_kept')}/{m.get('filters_total')} filters, "
                f"{m.get('layers_kept')}/{m.get('layers_total')} layers")
        lines = [head]
        for c, strongest in self.strongest_filters.items():
            chain = " → ".join(self.filter_label(layer, idx) for layer, idx, _ in strongest) or "(empty)"
            lines.append(f"{self.class_name(int(c))}: {chain}")
        return "\n".join(lines)

    @property
    def paths(self) -> Dict[str, List[List[Any]]]:
        """Deprecated name of :attr:`strongest_filters` (read-only; warns)."""
        warnings.warn("Chain.paths is deprecated: it is the strongest filter of each layer, not a path; "
                      "use Chain.strongest_filters", DeprecationWarning, stacklevel=2)
        return self.strongest_filters

    # ---- comparing ---------------------------------------------------------------------

    def _check_comparable(self, other: "Chain") -> None:
        if not isinstance(other, Chain):
            raise TypeError(f"other must be a Chain, got {type(other).__name__}")
        if other.model_hash != self.model_hash:
            raise ValueError("other was extracted from a different model (weights hash differs)")

    def jaccard(self, other: "Chain") -> float:
        """Jaccard index |A ∩ B| / |A ∪ B| of the two chains' kept filters (same model)."""
        self._check_comparable(other)
        a, b = self.filters(), other.filters()
        return len(a & b) / len(a | b) if a | b else 1.0

    def shared(self, other: "Chain") -> Dict[str, List[int]]:
        """Filters kept by both chains: layer -> sorted filter indices (layers with none left out)."""
        self._check_comparable(other)
        out: Dict[str, List[int]] = {}
        for layer in self.layer_sizes:
            common = sorted(set(self.kept.get(layer, [])) & set(other.kept.get(layer, [])))
            if common:
                out[layer] = common
        return out

    def __repr__(self) -> str:
        m = self.metrics
        return (f"Chain(filters={m.get('filters_kept')}/{m.get('filters_total')}, "
                f"layers={m.get('layers_kept')}/{m.get('layers_total')}, kl={m.get('kl', float('nan')):.4g}, "
                f"agreement={m.get('agreement', float('nan')):.3g})")
