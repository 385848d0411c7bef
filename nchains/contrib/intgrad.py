"""Integrated gradients of each site's neurons with a zero baseline (paper 2, Eq. 4).

For a site with activation ``a`` (the rest of the network below it unchanged),
``C = a · (1/S) Σ_j ∂Φ/∂a (α_j · a)`` with midpoint steps ``α_j = (j + 0.5) / S``. The prefix
below the site is computed once (:func:`nchains.contrib._suffix.prefixes`); only the suffix
runs on the scaled activations, every (step, image) pair a row of one batched call, chunked
to bound memory. Completeness ``Σ C = Φ(x) − Φ(x; a = 0)`` is not assumed: its error is
returned per site and image (``delta``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from nchains.contrib._suffix import chunks, prefixes, rows_per_chunk
from nchains.contrib.taylor import check_logits, target_logit
from nchains.graph.analysis import ModelGraph
from nchains.instrument.segment import Segment
from nchains.instrument.taps import Site
from nchains.ops import taylor_contributions

__all__ = ["intgrad"]


def _mean_gradient(seg: Segment, a: torch.Tensor, frontier, target: torch.Tensor, steps: int,
                   rows: int) -> torch.Tensor:
    """Tensor[N, *site shape]: ``(1/S) Σ_j ∂Φ/∂a`` at ``α_j · a``."""
    n = len(a)
    total = torch.zeros_like(a)
    ones = (1,) * (a.dim() - 1)
    for idx in chunks(steps * n, rows, a.device):
        img = idx % n
        alpha = ((idx // n).to(a.dtype) + 0.5) / steps
        scaled = (a.index_select(0, img) * alpha.view(-1, *ones)).requires_grad_(True)
        with torch.enable_grad():
            phi = target_logit(check_logits(seg.run([scaled], frontier, img)), target.index_select(0, img)).sum()
            if phi.requires_grad:
                grad, = torch.autograd.grad(phi, [scaled], allow_unused=True)
                if grad is not None:
                    total.index_add_(0, img, grad)
    return total / steps


def intgrad(graph: ModelGraph, chosen: Sequence[Site], images: torch.Tensor, logits: torch.Tensor,
            target: torch.Tensor, reduction: str, absolute: bool, steps: int, batch_size: Optional[int],
            bar) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Neuron integrated gradients at every site of ``chosen``.

    Args:
        graph (ModelGraph): the model's analysis.
        chosen (sequence of Site): the sites.
        images (Tensor[N, *input_shape]): on the model's device, in its dtype.
        logits (Tensor[N, K]): the original model's outputs at ``images``.
        target (LongTensor[N]): the explained class per image.
        reduction (str): ``"channel"`` (Tensor[N, C]) or ``"none"`` (the activation's shape).
        absolute (bool): ``|C|`` per neuron (before the channel sum).
        steps (int): Riemann steps S >= 1.
        batch_size (int or None): rows (image × step) per suffix run; None: by memory budget.
        bar: a tqdm bar, advanced once per site.

    Returns:
        (dict key -> contributions, dict key -> delta Tensor[N]), both in the order of ``chosen``.
    """
    values, delta = {}, {}
    phi_x = target_logit(logits, target)
    for seg, a, frontier in prefixes(graph, chosen, images):
        key = seg.inputs[0].key
        gbar = _mean_gradient(seg, a, frontier, target, steps, rows_per_chunk(seg, steps * len(a), batch_size))
        with torch.no_grad():
            phi_0 = target_logit(check_logits(seg.run([torch.zeros_like(a)], frontier)), target)
        values[key] = taylor_contributions(a, gbar, reduction=reduction, absolute=absolute)
        delta[key] = (a * gbar).flatten(1).sum(1) - (phi_x - phi_0)
        bar.update(1)
    return values, delta
