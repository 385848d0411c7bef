"""Distillation-guided routing, DGR (Wang et al. 2018, CDRP; sparse critical paths paper Eq. 3).

The pruning objective relaxed: a continuous gate ``λ_k ≥ 0`` multiplies every neuron ``a_k``
(``granularity="neuron"``, the critical-paths paper's port) or every channel of every
activation site (``"channel"``, the original CDRP's control gates), and the gates minimise

    L(Λ) = CE(softmax(Φ(x)), softmax(Φ(x; Λ ⊙ a))) + lam · ‖Λ‖₁        (Eq. 3)

— the cross-entropy from the original network's soft output (knowledge distillation) to the
gated network's, plus the L1 sparsity penalty — by SGD with momentum, clamping the gates to
``[0, clamp]`` after each step. At the end the gates are binarised: the
``round((1 − sparsity)·N)`` neurons with the largest gate (network-wise, ties by site order then
index, :func:`nchains.critical_paths.select`) when a sparsity is given, else every neuron whose
gate is > 0. A channel gate is shared by its channel's neurons; the count is still exact, so
the last channel at the cut may be kept in part.

Defaults and where they come from:

- ``lam=0.01``, ``steps=1000``, ``lr=0.01``: the critical-paths paper's port of DGR.
- ``momentum=0.9``: the original CDRP code (SGD momentum 0.9; the port says only "SGD").
- ``clamp=100.0``: the CDRP code's clamp for ResNets (the shipped model is one); it used
  ``[0, 5]`` for VGG. The CDRP code itself ran 30 iterations with ``lam=0.05``: pass
  ``steps=30, lam=0.05`` for that schedule.
- ``init=1.0``: Wang et al.'s initialisation, DGR(init=1); ``init="random"`` draws every gate
  from U(0, 1) with a ``torch.Generator`` seeded by ``seed`` (images in order), DGR(init=r),
  which the paper finds drifts much further from the original active path (Fig. 1, 2).

Several images run at once, each with its own gates (the sum of per-image losses has
per-image gradients): with ``init=1.0`` an image's path does not depend on the batch it ran
in; with ``init="random"`` image ``i`` of a batch takes the ``i``-th block of the seeded draws.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from nchains.baselines._batch import Batch, check_positive, check_sparsities, flat, install, make_paths, prepare, \
    split
from nchains.critical_paths.path import CriticalPath
from nchains.critical_paths.selection import select
from nchains.graph.analysis import ModelGraph

__all__ = ["GRANULARITIES", "dgr", "dgr_gates", "dgr_paths"]

GRANULARITIES = ("neuron", "channel")
MAX_STEPS = 1_000_000


def _gate_shape(shape, granularity: str):
    """A site's gate shape (no batch): the neuron shape, or one gate per channel (dim 0)."""
    return tuple(shape) if granularity == "neuron" else (shape[0],) + (1,) * (len(shape) - 1)


def _init_gates(batch: Batch, init, granularity: str, seed: int) -> List[torch.Tensor]:
    """Leaf tensors Tensor[B, *gate shape] per site, requiring grad."""
    b, dev, dtype = len(batch.images), batch.images.device, batch.images.dtype
    shapes = [_gate_shape(s, granularity) for s in batch.shapes]
    if init == "random":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draws = [[torch.rand(shape, generator=gen, dtype=torch.float64) for shape in shapes] for _ in range(b)]
        gates = [torch.stack([draws[i][j] for i in range(b)]) for j in range(len(shapes))]
        return [g.to(dev, dtype).requires_grad_(True) for g in gates]
    return [torch.full((b,) + shape, float(init), device=dev, dtype=dtype, requires_grad=True) for shape in shapes]


def _check(init, lam, steps, lr, momentum, granularity, clamp, seed):
    if isinstance(init, str):
        if init != "random":
            raise ValueError(f"init must be a positive number or 'random', got {init!r}")
    else:
        check_positive(init, "init", math.inf)
    check_positive(lam, "lam", math.inf, low_open=False)
    check_positive(steps, "steps", MAX_STEPS, integer=True)
    check_positive(lr, "lr", math.inf)
    check_positive(momentum, "momentum", 1.0, low_open=False)
    if momentum >= 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    check_positive(clamp, "clamp", math.inf)
    if not isinstance(init, str) and init > clamp:
        raise ValueError(f"init {init} is above clamp {clamp}; the gates start inside [0, clamp]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def dgr_loss(logits: torch.Tensor, soft_target: torch.Tensor, gates: Sequence[torch.Tensor], lam: float
             ) -> torch.Tensor:
    """Eq. 3 summed over the images: ``Σ_b [CE(p_b, softmax(z_b)) + lam·Σ_k λ_bk]``.

    Args:
        logits (Tensor[B, K]): the gated network's. soft_target (Tensor[B, K]): the original's softmax.
        gates (list of Tensor[B, ...]): non-negative, so ‖Λ‖₁ is their sum.
    """
    ce = -(soft_target * torch.log_softmax(logits, dim=1)).sum()
    return ce + lam * sum(g.sum() for g in gates)


def dgr_gates(batch: Batch, init=1.0, lam: float = 0.01, steps: int = 1000, lr: float = 0.01,
              momentum: float = 0.9, granularity: str = "neuron", clamp: float = 100.0, seed: int = 0,
              progress: bool = False) -> torch.Tensor:
    """Optimises Eq. 3 for the prepared images (:func:`nchains.baselines._batch.prepare`).

    Returns:
        Tensor[B, N]: the final gates per neuron (a channel's gate repeated over its neurons).
    """
    from tqdm.auto import tqdm

    _check(init, lam, steps, lr, momentum, granularity, clamp, seed)
    pm = batch.path_model(float_masks=True)
    gates = _init_gates(batch, init, granularity, seed)
    install(pm, {s.key: g for s, g in zip(batch.sites, gates)})
    soft = torch.softmax(batch.logits, dim=1)
    opt = torch.optim.SGD(gates, lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc="DGR", unit="step", disable=not progress, leave=False):
            opt.zero_grad(set_to_none=True)
            dgr_loss(pm(batch.images), soft, gates, lam).backward()
            opt.step()
            with torch.no_grad():
                for g in gates:
                    g.clamp_(0.0, clamp)
    b = len(batch.images)
    return torch.cat([g.detach().expand(b, *shape).reshape(b, -1) for g, shape in zip(gates, batch.shapes)], dim=1)


def _binarise(batch: Batch, gates: torch.Tensor, sparsity: Optional[float]) -> torch.Tensor:
    """BoolTensor[B, N]: top gates at ``sparsity`` per image (network-wise), or gates > 0."""
    if sparsity is None:
        return gates > 0
    per_site = split(gates, batch.sites)
    rows = [flat({k: v[None] for k, v in select({k: v[i] for k, v in per_site.items()}, sparsity).items()},
                 batch.sites) for i in range(len(gates))]
    return torch.cat(rows, dim=0)


def dgr_paths(model: nn.Module, images: torch.Tensor, sparsities: Sequence[Optional[float]] = (None,),
              target="pred", init=1.0, lam: float = 0.01, steps: int = 1000, lr: float = 0.01,
              momentum: float = 0.9, granularity: str = "neuron", clamp: float = 100.0, seed: int = 0,
              graph: Optional[ModelGraph] = None, progress: bool = False) -> List[List[CriticalPath]]:
    """DGR paths of several images (batched), binarised at each of ``sparsities`` from one run.

    Args: as :func:`dgr`; ``images`` Tensor[B, C, H, W]; ``sparsities`` a list (None: gates > 0).

    Returns:
        list per image of a list per sparsity of CriticalPath, method ``"dgr"``,
        ``contributions`` = the final gates.
    """
    levels = check_sparsities(sparsities, allow_none=True)
    _check(init, lam, steps, lr, momentum, granularity, clamp, seed)
    batch = prepare(model, images, target, graph)
    gates = dgr_gates(batch, init, lam, steps, lr, momentum, granularity, clamp, seed, progress)
    per_sparsity = [make_paths(batch, _binarise(batch, gates, s), "dgr", s, gates) for s in levels]
    return [[paths[i] for paths in per_sparsity] for i in range(len(batch.images))]


def dgr(model: nn.Module, image: torch.Tensor, sparsity: Optional[float] = None, target: Union[int, str] = "pred",
        init: Union[float, str] = 1.0, lam: float = 0.01, steps: int = 1000, lr: float = 0.01,
        momentum: float = 0.9, granularity: str = "neuron", clamp: float = 100.0, seed: int = 0,
        graph: Optional[ModelGraph] = None, progress: bool = False) -> CriticalPath:
    """The DGR path of one image (see the module docstring for the objective and the defaults).

    Args:
        model (nn.Module): a traceable ReLU network (eval mode is set; not modified).
        image (Tensor[1, C, H, W] or [C, H, W]): finite floats.
        sparsity (float or None): binarise at this sparsity in [0, 1]; None: keep gates > 0.
        target (int or "pred"): the class of the path's logit Φ (for ``linear_model``/``attribution``;
            the DGR loss distils the whole soft output).
        init (float or "random"): the gates' start, a number in (0, clamp], or U(0, 1) draws.
        lam (float): the L1 weight, >= 0. steps (int): SGD iterations, >= 1. lr (float): > 0.
        momentum (float): in [0, 1). granularity (str): ``"neuron"`` or ``"channel"``.
        clamp (float): the gates' upper bound, > 0. seed (int): for ``init="random"``.
        graph (ModelGraph): to reuse. progress (bool): a tqdm bar over the steps.

    Returns:
        CriticalPath (method ``"dgr"``; ``contributions``: the final gates per neuron).

    Example:
        >>> path = dgr(model, image, sparsity=0.99, init="random", seed=1)
        >>> path.kept_per_site
    """
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] != 1:
        raise ValueError(f"image must be one image, Tensor[1, C, H, W] or [C, H, W], got shape {list(image.shape)}; "
                         "dgr_paths takes a batch")
    return dgr_paths(model, image, [sparsity], target, init, lam, steps, lr, momentum, granularity, clamp, seed,
                     graph, progress)[0][0]
