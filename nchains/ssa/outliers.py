"""STEPS 2-4 of step-wise sensitivity analysis: Tukey outliers, frequency ranking, top-b choice.

- STEP 2: for each upper neuron ``n`` and image ``i`` the row ``omega[n, i, :]`` (one value per
  lower channel) has the quartiles ``Q1, Q3`` of :func:`torch.quantile` with linear
  interpolation (numpy.percentile's default ``"linear"`` method: the q-quantile of K sorted
  values sits at position ``q * (K - 1)``, interpolated between its neighbours). The relevant
  lower neurons are the **positive** outliers ``omega > Q3 + 1.5 * (Q3 - Q1)`` (strictly above
  the upper fence; the lower fence is not used).
- STEP 3: the frequency of a lower neuron ``k`` for ``n`` is the number of images in which it
  is an outlier.
- STEP 4: the ``branching`` lower neurons with the highest frequency are kept for ``n``; only
  neurons that were an outlier at least once are candidates (so fewer than ``branching`` may be
  kept). Ties in frequency are broken by the higher mean relevance (``omega[n, :, k]`` averaged
  over all images, outlier or not), then by the lower channel index.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

__all__ = ["FENCE", "OutlierCounts", "outliers", "select_top"]

#: Tukey's fence factor (1.5 x the inter-quartile range).
FENCE = 1.5


def outliers(omega: torch.Tensor) -> torch.Tensor:
    """Positive Tukey outliers of every row.

    Args:
        omega (Tensor[..., K]): relevance rows (K >= 1 lower neurons each).

    Returns:
        Tensor[..., K] of bool: ``omega > Q3 + 1.5 * IQR`` of its row.
    """
    q = torch.tensor([0.25, 0.75], dtype=omega.dtype, device=omega.device)
    q1, q3 = torch.quantile(omega, q, dim=-1, keepdim=True, interpolation="linear")
    return omega > q3 + FENCE * (q3 - q1)


class OutlierCounts:
    """Frequencies and relevance sums of one (upper unit, lower unit) step, accumulated over
    image chunks (STEPS 2 and 3).

    Attributes:
        frequency (Tensor[m, K], int64): images in which lower neuron k is an outlier for upper
            neuron n.
        total (Tensor[m, K], float64): ``omega`` summed over the images.
        images (int): images counted.
    """

    def __init__(self, m: int, k: int):
        self.frequency = torch.zeros(m, k, dtype=torch.long)
        self.total = torch.zeros(m, k, dtype=torch.float64)
        self.images = 0

    def add(self, omega: torch.Tensor) -> None:
        """Counts a chunk: ``omega`` Tensor[m, N, K]."""
        self.frequency += outliers(omega).sum(1).cpu()
        self.total += omega.sum(1).to(device="cpu", dtype=torch.float64)
        self.images += omega.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        """Tensor[m, K], float64: mean relevance over the images."""
        return self.total / max(1, self.images)


def select_top(frequency: torch.Tensor, mean: torch.Tensor, branching: int) -> List[List[Tuple[int, int, float]]]:
    """STEP 4: the kept lower neurons of every upper neuron.

    Args:
        frequency (Tensor[m, K], int): outlier counts.
        mean (Tensor[m, K], float): mean relevance (the first tie-break).
        branching (int): at most this many per upper neuron.

    Returns:
        list (one per upper neuron) of ``(k, frequency, mean relevance)``, best first.
    """
    freq, rel = frequency.cpu().numpy(), mean.cpu().double().numpy()
    out = []
    for f, r in zip(freq, rel):
        k = np.arange(len(f))
        order = np.lexsort((k, -r, -f))  # last key first: frequency, then relevance, then index
        order = [j for j in order[:branching] if f[j] > 0]
        out.append([(int(j), int(f[j]), float(r[j])) for j in order])
    return out
