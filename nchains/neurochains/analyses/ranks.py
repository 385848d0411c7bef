"""Rank and linear correlation of two lists of numbers (Spearman's rho, Pearson's r), without
SciPy: ties get their average rank, as in ``scipy.stats.spearmanr``."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["average_ranks", "pearson", "spearman"]


def average_ranks(values: Sequence[float]) -> torch.Tensor:
    """Ranks 1..n of ``values`` (float64), tied values sharing the mean of their ranks.

    Example:
        >>> average_ranks([3.0, 1.0, 3.0]).tolist()
        [2.5, 1.0, 2.5]
    """
    x = torch.as_tensor(list(values), dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def pearson(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Pearson's r of ``a`` and ``b`` (same length); None with fewer than 2 pairs or a constant list."""
    x = torch.as_tensor(list(a), dtype=torch.float64)
    y = torch.as_tensor(list(b), dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    den = float(torch.sqrt((x * x).sum() * (y * y).sum()))
    if den == 0.0 or not math.isfinite(den):
        return None
    return max(-1.0, min(1.0, float((x * y).sum()) / den))


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman's rho: Pearson's r of the average ranks; None as for :func:`pearson`."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    return pearson(average_ranks(a).tolist(), average_ranks(b).tolist())
