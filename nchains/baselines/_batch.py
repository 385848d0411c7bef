"""Shared machinery of the pruning baselines: one path model, per-image gates, flat bookkeeping.

Greedy pruning and DGR optimise a mask (or gates) per image. Both run many images at once: the
path model of :func:`nchains.critical_paths.build_path_model` (``constants="zero"``, the
multiplicative mask ``m ⊙ a`` of the pruning objective, Eq. 1) gets a *batched* tensor
``[B, *site shape]`` in each :class:`~nchains.critical_paths.SiteGate`, so row ``b`` of the
batch sees only its own mask. ``PathModel.set_masks`` checks masks for one image and in [0, 1]
(a path); the baselines' masks carry a batch dimension and DGR's gates go up to the clamp (5 or
100), so :func:`install` writes the gate buffers directly, after the caller checked the values.

Bookkeeping is on one flat tensor ``[B, N]`` (N the neurons of all activation sites, in site
order, row-major inside a site): :func:`flat` / :func:`split` convert, never a per-neuron loop.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.tensors import check_images
from nchains.critical_paths.path import CriticalPath, resolve_target
from nchains.critical_paths.path_model import PathModel, build_path_model
from nchains.critical_paths.selection import kept_count
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.instrument.taps import Site, sites

__all__ = ["Batch", "check_positive", "check_sparsities", "flat", "install", "make_paths", "prepare", "split"]


class Batch:
    """Images, targets and the path model the baselines work on (built by :func:`prepare`).

    Attributes:
        model (nn.Module): the network, in eval mode.
        images (Tensor[B, C, H, W]): on the model's device and dtype.
        targets (LongTensor[B]): the class of the logit Φ per image.
        graph (ModelGraph): the analysis of the model at the images' shape.
        sites (tuple of Site): the activation sites, in execution order.
        shapes (list of tuple): each site's neuron shape (no batch).
        n (int): neurons of all sites together.
        logits (Tensor[B, K]): the original model's logits.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, graph: ModelGraph,
                 logits: torch.Tensor):
        self.model, self.images, self.targets, self.graph, self.logits = model, images, targets, graph, logits
        self.sites = tuple(sites(graph, "activations"))
        if not self.sites:
            raise ValueError("model has no activation sites (ReLU, SiLU, ... calls); a path needs neurons")
        self.shapes = [tuple(s.shape[1:]) for s in self.sites]
        self.n = sum(math.prod(shape) for shape in self.shapes)

    def path_model(self, float_masks: bool, return_sites: bool = False) -> PathModel:
        """The model with a multiplicative gate on every site (all ones: the original network)."""
        dtype = self.images.dtype if float_masks else torch.bool
        masks = {s.key: torch.ones(shape, dtype=dtype, device=self.images.device)
                 for s, shape in zip(self.sites, self.shapes)}
        return build_path_model(self.graph, masks, "zero", return_sites=return_sites)

    def original_activations(self) -> torch.Tensor:
        """Every neuron's activation in the original network: Tensor[B, N]."""
        pm = self.path_model(float_masks=False, return_sites=True)
        with torch.no_grad():
            _, values = pm(self.images)
        return flat(values, self.sites)


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    b = logits.shape[0]
    if isinstance(target, (list, tuple)) or (isinstance(target, torch.Tensor) and target.dim() == 1):
        items = list(target.tolist() if isinstance(target, torch.Tensor) else target)
        if len(items) != b:
            raise ValueError(f"target: one class per image expected ({b}), got {len(items)}")
        chosen = [resolve_target(t, logits[i:i + 1]) for i, t in enumerate(items)]
    else:
        chosen = [resolve_target(target, logits[i:i + 1]) for i in range(b)]
    return torch.tensor(chosen, dtype=torch.long, device=logits.device)


def prepare(model: nn.Module, images: torch.Tensor, target, graph: Optional[ModelGraph] = None,
            name: str = "images") -> Batch:
    """Checks the model, the images and the target, and analyses the model (``graph`` reused).

    Args:
        model (nn.Module): the network.
        images (Tensor[B, C, H, W] or [C, H, W]): finite floats.
        target ("pred", int, or a sequence of B of them): the class of Φ per image.

    Raises:
        TypeError, ValueError: on a bad argument.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = images.unsqueeze(0)
    check_images(images, name=name)
    device, dtype = model_device_dtype(model)
    images = images.detach().to(device, dtype)
    model.eval()
    graph = graph_for(model, images.shape[1:], graph, example=images[:1])
    with torch.no_grad():
        logits = model(images).detach()
    return Batch(model, images, _targets(target, logits), graph, logits)


def check_positive(value, name: str, high: float = math.inf, integer: bool = False, low_open: bool = True):
    """``value`` when it is a finite number in (0, high] (an int with ``integer``); ValueError/TypeError naming it."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'} in (0, {high}], got "
                        f"{type(value).__name__}")
    ok = math.isfinite(value) and (value > 0 if low_open else value >= 0) and value <= high
    if not ok:
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} in "
                         f"{'(' if low_open else '['}0, {high}], got {value}")
    return value


def check_sparsities(sparsities, allow_none: bool = False) -> List[Optional[float]]:
    """A sparsity or a non-empty list of them, each in [0, 1] (None too with ``allow_none``)."""
    items = list(sparsities) if isinstance(sparsities, (list, tuple)) else [sparsities]
    if not items:
        raise ValueError("sparsity: give at least one value in [0, 1]")
    for s in items:
        if not (allow_none and s is None):
            kept_count(s, 0)  # TypeError/ValueError naming sparsity
    return [None if s is None else float(s) for s in items]


def flat(values: Mapping[str, torch.Tensor], order: Sequence[Site]) -> torch.Tensor:
    """``{key: Tensor[B, *site shape]}`` -> Tensor[B, N], sites in ``order``."""
    return torch.cat([values[s.key].reshape(values[s.key].shape[0], -1) for s in order], dim=1)


def split(values: torch.Tensor, order: Sequence[Site]) -> Dict[str, torch.Tensor]:
    """Tensor[B, N] -> ``{key: Tensor[B, *site shape]}`` (views), the inverse of :func:`flat`."""
    out, start = {}, 0
    for s in order:
        shape = tuple(s.shape[1:])
        size = math.prod(shape)
        out[s.key] = values[:, start:start + size].reshape(values.shape[0], *shape)
        start += size
    return out


def install(pm: PathModel, values: Mapping[str, torch.Tensor]) -> None:
    """Puts ``values[key]`` (Tensor[B, *site shape] or broadcastable, bool or float, checked by
    the caller) as the mask of every site's gate; the tensor itself, so a leaf that requires
    grad receives the gradient of the gate."""
    for key, value in values.items():
        pm.gate(key).mask = value


def make_paths(batch: Batch, masks: torch.Tensor, method: str, sparsity: Optional[float],
               scores: Optional[torch.Tensor] = None) -> List[CriticalPath]:
    """One CriticalPath per image from Tensor[B, N] masks (and scores, stored as contributions)."""
    per_site = split(masks, batch.sites)
    per_score = split(scores.detach(), batch.sites) if scores is not None else None
    paths = []
    for b in range(len(batch.images)):
        mask = {k: v[b].clone() for k, v in per_site.items()}
        contrib = None if per_score is None else {k: v[b].clone() for k, v in per_score.items()}
        paths.append(CriticalPath(batch.model, batch.images[b:b + 1], mask, target=int(batch.targets[b]),
                                  method=method, contributions=contrib, graph=batch.graph,
                                  requested_sparsity=sparsity))
    return paths


def as_list(value: Union[float, Sequence[float], None]) -> bool:
    """Whether ``value`` is a sequence (the caller returns a list per sparsity)."""
    return isinstance(value, (list, tuple))
