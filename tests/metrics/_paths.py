"""Masks for the metrics tests, built from taps independently of nchains.critical_paths."""

from __future__ import annotations

import torch

from nchains.graph.analysis import analyze
from nchains.instrument.taps import sites, tap


def site_values(model, image):
    """(activations, |a·∂Φ/∂a| of the predicted class) per activation site, without the batch."""
    graph = analyze(model, image)
    out, values = tap(graph, sites(graph))(image)
    target = int(out[0].argmax())
    grads = torch.autograd.grad(out[0, target], list(values.values()))
    acts = {k: v[0].detach() for k, v in values.items()}
    contrib = {k: (v[0] * g[0]).abs().detach() for (k, v), g in zip(values.items(), grads)}
    return acts, contrib, target


def top_mask(scores, keep: float):
    """The network-wise top ``keep`` share of neurons by score (ties at the threshold kept)."""
    flat = torch.cat([v.flatten() for v in scores.values()])
    threshold = flat.topk(max(1, int(keep * flat.numel()))).values[-1]
    return {k: v >= threshold for k, v in scores.items()}
