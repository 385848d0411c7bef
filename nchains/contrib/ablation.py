"""Exact ablation: ``Φ(x) − Φ(x; channel c = 0)`` for every channel of every site.

The prefix below each site is computed once; each (channel, image) pair is one row of a batched
suffix run (many channels zeroed per forward), chunked to bound memory. No gradient.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from nchains.contrib._suffix import chunks, prefixes, rows_per_chunk
from nchains.contrib.taylor import check_logits, target_logit
from nchains.graph.analysis import ModelGraph
from nchains.instrument.taps import Site

__all__ = ["ablation"]


def ablation(graph: ModelGraph, chosen: Sequence[Site], images: torch.Tensor, logits: torch.Tensor,
             target: torch.Tensor, absolute: bool, batch_size: Optional[int], bar) -> Dict[str, torch.Tensor]:
    """The marginal contribution of every channel of every site of ``chosen``.

    Args:
        graph (ModelGraph): the model's analysis.
        chosen (sequence of Site): the sites (activations ``[N, C, ...]``; a flat site's channels
            are its features).
        images (Tensor[N, *input_shape]): on the model's device, in its dtype.
        logits (Tensor[N, K]): the original model's outputs at ``images``.
        target (LongTensor[N]): the explained class per image.
        absolute (bool): ``|Φ(x) − Φ(x; c = 0)|``.
        batch_size (int or None): rows (image × channel) per suffix run; None: by memory budget.
        bar: a tqdm bar, advanced once per site.

    Returns:
        dict key -> Tensor[N, C], in the order of ``chosen``.
    """
    out = {}
    phi_x = target_logit(logits, target)
    with torch.no_grad():
        for seg, a, frontier in prefixes(graph, chosen, images):
            n, c = a.shape[:2]
            result = torch.empty(c, n, dtype=a.dtype, device=a.device)
            for idx in chunks(c * n, rows_per_chunk(seg, c * n, batch_size), a.device):
                img, channel = idx % n, idx // n
                rows = a.index_select(0, img)
                rows[torch.arange(len(idx), device=a.device), channel] = 0
                phi = target_logit(check_logits(seg.run([rows], frontier, img)), target.index_select(0, img))
                result.view(-1)[idx] = phi_x.index_select(0, img) - phi
            result = result.t().contiguous()
            out[seg.inputs[0].key] = result.abs() if absolute else result
            bar.update(1)
    return out
