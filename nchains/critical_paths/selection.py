"""Selecting the neurons of a critical path: the largest contributions, network-wise.

The paper (sparse critical paths, Sec. 2.3) keeps every neuron whose contribution ``c`` is at
least ``c_κ``, the value at the requested sparsity in one list of all neurons of the network:
neurons of different layers compete directly (integrated gradients satisfy completeness per
layer, so their values are comparable). :func:`select` does that with one threshold over the
concatenation of every site's scores, found with ``torch.kthvalue`` (average O(N), on the
scores' device, no host sort). ``per_layer=True`` keeps the same fraction of every site instead,
for comparison.

Ties: exactly ``round((1 - sparsity) * N)`` neurons are kept. When several neurons share the
threshold value and only some of them fit, the ones first in *site order, then flat (row-major)
index within the site* are kept, so the selection is a pure function of the scores.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import torch

__all__ = ["kept_count", "select", "threshold"]


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1], got {type(sparsity).__name__}")
    if not (math.isfinite(float(sparsity)) and 0.0 <= float(sparsity) <= 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1] (the fraction of neurons left out), got {sparsity}")
    return float(sparsity)


def _check_scores(scores: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty mapping site key -> Tensor of contributions, got "
                        f"{type(scores).__name__}")
    device = None
    for key, value in scores.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"scores[{key!r}] must be a floating-point Tensor, got "
                            f"{type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
        if value.numel() == 0:
            raise ValueError(f"scores[{key!r}] is empty (shape {tuple(value.shape)})")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"scores[{key!r}] contains NaN/Inf; accepted: finite contributions only")
        if device is not None and value.device != device:
            raise ValueError(f"scores are on several devices ({device} and {value.device} at {key!r})")
        device = value.device
    return dict(scores)


def kept_count(sparsity: float, total: int) -> int:
    """``round((1 - sparsity) * total)``, the neurons a selection keeps (Python's round: halves to even)."""
    return int(round((1.0 - _check_sparsity(sparsity)) * int(total)))


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """BoolTensor of ``flat``'s shape: its ``k`` largest values, ties broken by the lowest index.

    O(N): ``kthvalue`` finds the k-th largest value ``t``; every value above ``t`` is kept and,
    of those equal to ``t``, the first ones in index order (a cumulative count) fill the rest.
    """
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    t = flat.kthvalue(n - k + 1).values  # the k-th largest: the (n - k + 1)-th smallest
    above = flat > t
    at = flat == t
    room = k - int(above.sum())
    if room == int(at.sum()):  # every value at the threshold fits (no tie to break): the common case
        return above | at
    return above | (at & (torch.cumsum(at, 0) <= room))


def threshold(scores: Mapping[str, torch.Tensor], sparsity: float) -> float:
    """``c_κ``: the smallest contribution kept by the network-wise selection (``inf`` when none is kept)."""
    scores = _check_scores(scores)
    flat = torch.cat([v.detach().reshape(-1) for v in scores.values()])
    k = kept_count(sparsity, flat.numel())
    return float("inf") if k == 0 else float(flat.kthvalue(flat.numel() - k + 1).values)


def select(scores: Mapping[str, torch.Tensor], sparsity: float, per_layer: bool = False) -> Dict[str, torch.Tensor]:
    """The neurons of the critical path at ``sparsity``: a mask per site.

    Args:
        scores (mapping str -> Tensor[*site shape]): the contribution of every neuron of every
            site (no batch dimension), in site (execution) order; floating point, finite.
            Larger is more critical (rank absolute values by passing ``|c|``).
        sparsity (float): in [0, 1], the fraction of neurons left out; ``round((1 - sparsity) * N)``
            neurons are kept, N the neurons of all sites together.
        per_layer (bool): False (the paper): one threshold over all sites. True: each site keeps
            ``round((1 - sparsity) * N_site)`` of its own neurons.

    Returns:
        dict str -> BoolTensor[*site shape] on the scores' device, True = on the path; same keys
        and order as ``scores``. Ties at the threshold: the first neurons in site order, then
        row-major index, are kept.

    Raises:
        TypeError, ValueError: on a sparsity outside [0, 1], non-finite or non-float scores.
    """
    sparsity = _check_sparsity(sparsity)
    scores = _check_scores(scores)
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be a bool, got {type(per_layer).__name__}")
    if per_layer:
        return {key: _top(v.detach().reshape(-1), kept_count(sparsity, v.numel())).reshape(v.shape)
                for key, v in scores.items()}
    flat = torch.cat([v.detach().reshape(-1) for v in scores.values()])  # dtypes promote
    keep = _top(flat, kept_count(sparsity, flat.numel()))
    out, start = {}, 0
    for key, v in scores.items():
        out[key] = keep[start:start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out
