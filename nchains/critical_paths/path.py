"""A critical path of one image: which neurons are on it, and what follows from it.

:class:`CriticalPath` holds a mask per activation site (True = on the path) for one image and
one target logit, with the contributions it was selected by (when known). From it come the
locally linear path model Φ(x; e) (:meth:`CriticalPath.linear_model`, paper Sec. 3.1) and the
path-gradient input attribution (:meth:`CriticalPath.attribution`, Sec. 3.2). Any selection
method builds one through the public constructor (contribution ranking in
:func:`nchains.critical_path`; pruning baselines from their own masks). Files: :mod:`.path_file`.

Example:
    >>> p = CriticalPath(model, image, masks, target=7, method="greedy")
    >>> p.sparsity, p.kept_per_site["layer4.1.relu@1"]
    >>> heat = p.attribution()                     # Tensor[1, C, H, W]
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.io import PathLike
from nchains._util.tensors import check_images
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.critical_paths.path_model import CONSTANTS, PathModel, build_path_model, check_site_tensor
from nchains.instrument.taps import Site, sites

__all__ = ["CriticalPath", "check_image", "resolve_target"]


def check_image(image, model: nn.Module, name: str = "image") -> torch.Tensor:
    """``image`` as Tensor[1, C, H, W] on the model's device and dtype (a [C, H, W] gains the batch).

    Raises:
        TypeError, ValueError: not a floating-point finite tensor of 3 or 4 dims with batch 1.
    """
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    check_images(image, name=name)
    if image.shape[0] != 1:
        raise ValueError(f"{name} must be one image, Tensor[1, C, H, W] or [C, H, W], got shape "
                         f"{list(image.shape)}")
    device, dtype = model_device_dtype(model)
    return image.detach().to(device, dtype)


def resolve_target(target, logits: torch.Tensor) -> int:
    """The class index of ``target`` (``"pred"``: the argmax of ``logits`` Tensor[1, K], or an int in [0, K))."""
    k = logits.shape[1]
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"target must be 'pred' or a class index in [0, {k}), got {target!r}")
        return int(logits[0].argmax())
    if isinstance(target, torch.Tensor) and target.dim() == 0 and not target.is_floating_point():
        target = int(target)
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target must be 'pred' or an int class index, got {type(target).__name__}")
    if not 0 <= target < k:
        raise ValueError(f"target must be 'pred' or a class index in [0, {k}), got {target}")
    return target


def _check_masks(mask, all_sites) -> Dict[str, torch.Tensor]:
    if not isinstance(mask, Mapping):
        raise TypeError(f"mask must be a mapping site key -> BoolTensor, got {type(mask).__name__}")
    keys = [s.key for s in all_sites]
    unknown = [k for k in mask if k not in set(keys)]
    if unknown:
        raise ValueError(f"mask: unknown site {unknown[0]!r}; accepted: the model's activation sites "
                         f"({', '.join(keys[:4])}{', …' if len(keys) > 4 else ''})")
    out = {}
    for s in all_sites:
        m = mask.get(s.key)
        if m is None:
            raise ValueError(f"mask: no entry for site {s.key!r}; a critical path covers every activation site")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"mask[{s.key!r}] must be a BoolTensor, got "
                            f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if tuple(m.shape) != tuple(s.shape[1:]):
            raise ValueError(f"mask[{s.key!r}] must have the neuron shape {list(s.shape[1:])}, got {list(m.shape)}")
        out[s.key] = m.detach()
    return out


def _check_contributions(contributions, all_sites) -> Optional[Dict[str, torch.Tensor]]:
    if contributions is None:
        return None
    if not isinstance(contributions, Mapping):
        raise TypeError(f"contributions must be a mapping site key -> Tensor or None, got "
                        f"{type(contributions).__name__}")
    out = {s.key: check_site_tensor(f"contributions[{s.key!r}]", contributions.get(s.key), s) for s in all_sites}
    extra = [k for k in contributions if k not in out]
    if extra:
        raise ValueError(f"contributions: unknown site {extra[0]!r}")
    return out


class CriticalPath:
    """The neurons on the critical path of one image's target logit, per activation site.

    Args:
        model (nn.Module): the network (put in eval mode; not modified).
        image (Tensor[1, C, H, W] or [C, H, W]): the input, finite floats; moved to the model's
            device and dtype.
        mask (mapping str -> BoolTensor[*site shape]): for every activation site of the model
            (:func:`nchains.instrument.taps.sites`, keys like ``layer1.0.relu@1``), True = on the path.
        target (int or "pred"): the class whose pre-softmax logit Φ the path explains.
        method (str): how the mask was selected (``"intgrad"``, ``"mct"``, ``"greedy"``, ...).
        contributions (mapping str -> Tensor[*site shape]): the scores the mask was selected by.
        graph (ModelGraph): ``nchains.analyze(model, image)`` to reuse (checked).
        requested_sparsity (float): the sparsity asked for, when the mask comes from a selection.

    Attributes:
        mask, contributions, target, method, sites (tuple of Site), graph, image, model,
        sparsity (achieved: 1 − kept / total), n_kept, n_total, kept_per_site (dict str -> int),
        requested_sparsity, logits (Tensor[1, K], the original model's at the image).

    Raises:
        TypeError, ValueError: on any argument that does not fit the model (a missing or unknown
            site, a mask of another shape, a target out of range...).
    """

    def __init__(self, model: nn.Module, image: torch.Tensor, mask: Mapping[str, torch.Tensor], *,
                 target: Union[int, str], method: str, contributions: Optional[Mapping[str, torch.Tensor]] = None,
                 graph: Optional[ModelGraph] = None, requested_sparsity: Optional[float] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(method, str) or not method:
            raise TypeError(f"method must be a non-empty str naming the selection, got {method!r}")
        if requested_sparsity is not None:
            from nchains.critical_paths.selection import kept_count

            kept_count(requested_sparsity, 0)  # the range check
        self.model = model.eval()
        self.image = check_image(image, model)
        self.graph = graph_for(model, self.image.shape[1:], graph, example=self.image)
        self.sites: Tuple[Site, ...] = tuple(sites(self.graph, "activations"))
        if not self.sites:
            raise ValueError("model has no activation sites (ReLU, SiLU, ... calls); a critical path needs neurons")
        self.mask = _check_masks(mask, self.sites)
        self.contributions = _check_contributions(contributions, self.sites)
        with torch.no_grad():
            self.logits = model(self.image).detach()
        self.target = resolve_target(target, self.logits)
        self.method = method
        self.requested_sparsity = None if requested_sparsity is None else float(requested_sparsity)
        self.kept_per_site = {k: int(m.sum()) for k, m in self.mask.items()}
        self.n_total = sum(m.numel() for m in self.mask.values())
        self.n_kept = sum(self.kept_per_site.values())
        self.sparsity = 1.0 - self.n_kept / self.n_total
        self._models: Dict[str, PathModel] = {}

    def __repr__(self) -> str:
        return (f"CriticalPath(method={self.method!r}, target={self.target}, kept {self.n_kept}/{self.n_total} "
                f"neurons, sparsity {self.sparsity:.4f}, {len(self.sites)} sites)")

    @property
    def threshold(self) -> Optional[float]:
        """The smallest contribution on the path (``c_κ``), or None without contributions or neurons.
        Prop. 5 of the paper (a locally linear path model) needs it > 0."""
        if self.contributions is None or self.n_kept == 0:
            return None
        return min(float(c[self.mask[k]].min()) for k, c in self.contributions.items() if self.kept_per_site[k])

    def linear_model(self, constants: str = "original") -> PathModel:
        """The path model Φ(x; e): each neuron off the path held at its activation at the image
        (``"original"``, locally linear; at the image exactly the original logits) or at 0
        (``"zero"``, the multiplicative mask). Built once per ``constants`` and cached.

        Returns:
            PathModel mapping Tensor[N, C, H, W] to logits Tensor[N, K].
        """
        if constants not in CONSTANTS:
            raise ValueError(f"constants must be one of {', '.join(CONSTANTS)}, got {constants!r}")
        if constants not in self._models:
            self._models[constants] = build_path_model(self.graph, self.mask, constants, image=self.image)
        return self._models[constants]

    def attribution(self, times_input: bool = False, constants: str = "original") -> torch.Tensor:
        """The path gradient ∂Φ(x; e)/∂x of the target logit at the image (paper Sec. 3.2, Fig. 4/5).

        Args:
            times_input (bool): multiply by the image (gradient × input).
            constants (str): the path model's constants (see :meth:`linear_model`).

        Returns:
            Tensor[1, C, H, W], on the model's device and dtype. At sparsity 0 it is the plain
            input gradient of the model.
        """
        if not isinstance(times_input, bool):
            raise TypeError(f"times_input must be a bool, got {type(times_input).__name__}")
        phi = self.linear_model(constants)
        x = self.image.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(phi(x)[0, self.target], x)
        return grad * self.image if times_input else grad

    def summary(self) -> Dict[str, Any]:
        """JSON-able description: method, target, sparsity, neurons kept per site (with labels)."""
        return {"method": self.method, "target": self.target, "requested_sparsity": self.requested_sparsity,
                "sparsity": self.sparsity, "kept": self.n_kept, "total": self.n_total,
                "threshold": self.threshold,
                "sites": [{"key": s.key, "label": s.label, "shape": list(s.shape[1:]),
                           "kept": self.kept_per_site[s.key], "total": self.mask[s.key].numel()}
                          for s in self.sites]}

    def save(self, path: PathLike, contributions: bool = True) -> None:
        """Writes the path to ``path`` (an ``.npz``: masks, image, contributions, JSON metadata),
        atomically (see :mod:`nchains.critical_paths.path_file`)."""
        from nchains.critical_paths.path_file import save_path

        save_path(self, path, contributions=contributions)

    @classmethod
    def load(cls, path: PathLike, model: Optional[nn.Module] = None, graph: Optional[ModelGraph] = None
             ) -> "CriticalPath":
        """Reads a path written by :meth:`save`, validated field by field against ``model``
        (default: the shipped model, when the file records it)."""
        from nchains.critical_paths.path_file import load_path

        return load_path(path, model, graph)

    def export(self, out_dir: PathLike, formats="onnx,pt2", *, constants: str = "original",
               progress: bool = False) -> Dict[str, Any]:
        """Exports :meth:`linear_model` through the verified exporter
        (:func:`nchains.export.module_export.export_module`) with this path's summary as metadata.

        Returns:
            dict: the manifest written to ``out_dir/manifest.json``.
        """
        from nchains.export.module_export import export_module

        phi = self.linear_model(constants)
        meta = {"critical_path": {**self.summary(), "constants": constants, "image_shape": list(self.image.shape)}}
        return export_module(phi.net, out_dir, self.image, formats=formats, images=self.image, metadata=meta,
                             progress=progress)
