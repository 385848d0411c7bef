"""Greedy pruning (sparse critical paths paper, Sec. 2.2, Algorithm 1): the pathological baseline.

Start from the whole network (mask m = 1) and repeat: rank the neurons still in the path by
their Taylor relevance ``s = |a·∂Φ/∂a|`` (Eq. 2) *on the current masked network* ``Φ(x; m ⊙ a)``,
and remove the lowest-ranked neurons whose score is not zero, ``step`` (1 %) of the neurons
still kept per step, until ``‖m‖₀ ≤ κ = round((1 − sparsity)·N)``. Skipping the zero-score
neurons is the paper's tweak: without it the dead neurons (score 0) would go first; with it
every removal of a live neuron changes the activation pattern and some originally dead neurons
come alive and stay in the path. That is the pathology the paper exposes (Fig. 1: ~70 % of the
top 1 % of neurons originally dead on VGG-16).

Ranks are recomputed after every step: one forward and one backward of the masked network per
step, for a whole batch of images at once (one mask per image, flat ``[B, N]`` bookkeeping).

**When the non-zero scores run out.** A neuron with score 0 is dead in the masked network (or
has no gradient path to Φ). When every kept neuron scores 0 before κ is reached (on the small
Fashion-MNIST ResNets about half the neurons are dead at an image), Algorithm 1 has nothing
left to remove: greedy pruning stops there, the returned path's ``sparsity`` is the one reached
(below ``requested_sparsity``) and a :class:`GreedyStoppedEarly` warning says so. With
``continue_by_activation=True`` it goes on instead, removing ``step`` of the kept neurons per
step by their *original* activation (lowest first, so originally dead neurons go first), ranks
by score resuming as soon as a kept neuron scores non-zero again.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from nchains.baselines._batch import Batch, check_positive, check_sparsities, flat, install, make_paths, prepare, \
    split
from nchains.critical_paths.path import CriticalPath
from nchains.critical_paths.selection import kept_count
from nchains.graph.analysis import ModelGraph

__all__ = ["GreedyStoppedEarly", "greedy_paths", "greedy_pruning"]


class GreedyStoppedEarly(UserWarning):
    """Greedy pruning ran out of neurons with a non-zero score before the requested sparsity."""


def _scores(pm, batch: Batch, kept: torch.Tensor) -> torch.Tensor:
    """``|a·∂Φ/∂a|`` of every neuron in the masked networks: Tensor[B, N] (0 off the mask)."""
    install(pm, split(kept, batch.sites))
    logits, values = pm(batch.images)
    phi = logits.gather(1, batch.targets[:, None]).sum()  # rows are independent: one backward for all
    grads = torch.autograd.grad(phi, [values[s.key] for s in batch.sites])
    return torch.cat([(values[s.key].detach() * g).abs().reshape(len(g), -1)
                      for s, g in zip(batch.sites, grads)], dim=1)


def _remove_lowest(kept: torch.Tensor, value: torch.Tensor, count: torch.Tensor) -> None:
    """Clears in ``kept`` (BoolTensor[B, N]) the ``count[b]`` entries of row b with the lowest
    ``value`` (at most the row's finite values), in place. Ties at the cut: lowest index first.

    One ``topk`` finds each row's cut value ``t``; every value below ``t`` goes and, of those
    equal to ``t``, the first ones in index order fill the rest (a full sort is 10x slower).
    """
    most = int(count.max())
    if most == 0:
        return
    lowest = torch.topk(value, most, dim=1, largest=False, sorted=True).values
    cut = lowest.gather(1, (count - 1).clamp(min=0)[:, None])
    below, at = value < cut, value == cut
    room = count - below.sum(1)
    drop = (below | (at & (torch.cumsum(at, 1) <= room[:, None]))) & (count > 0)[:, None]
    kept &= ~drop


def _greedy(batch: Batch, goals: List[int], step: float, by_activation: bool, progress: bool):
    """Runs Algorithm 1 to each kept count in ``goals`` (decreasing) for every image.

    Returns:
        list per goal of (kept BoolTensor[B, N], scores Tensor[B, N] on that mask).
    """
    from tqdm.auto import tqdm

    pm = batch.path_model(float_masks=False, return_sites=True)
    b, dev = len(batch.images), batch.images.device
    kept = torch.ones(b, batch.n, dtype=torch.bool, device=dev)
    original = batch.original_activations() if by_activation else None
    level = [0] * b  # the next goal of each image
    snaps = [[None] * b for _ in goals]
    bar = tqdm(total=b * (batch.n - goals[-1]), desc="greedy pruning", unit="neuron", disable=not progress,
               leave=False)
    while True:
        scores = _scores(pm, batch, kept)
        cand = kept & (scores != 0)
        n_kept, n_cand = kept.sum(1), cand.sum(1)
        kept_l, cand_l = n_kept.tolist(), n_cand.tolist()
        for i in range(b):  # per image, not per neuron: record the goals reached, give up where stuck
            while level[i] < len(goals) and (kept_l[i] <= goals[level[i]] or (cand_l[i] == 0 and not by_activation)):
                snaps[level[i]][i] = (kept[i].clone(), scores[i].clone())
                level[i] += 1
                if level[i] == len(goals):
                    bar.update(kept_l[i] - goals[-1])
        if min(level) == len(goals):
            break
        active = torch.tensor([lv < len(goals) for lv in level], device=dev)
        goal = torch.tensor([goals[min(lv, len(goals) - 1)] for lv in level], device=dev)
        n_rm = torch.where(active, (n_kept.to(torch.float64) * step).round().long().clamp(min=1), 0)
        n_rm = torch.minimum(n_rm, (n_kept - goal).clamp(min=0))
        stuck = n_cand == 0
        _remove_lowest(kept, torch.where(cand, scores, torch.inf), torch.where(stuck, 0, torch.minimum(n_rm, n_cand)))
        if by_activation and bool((stuck & active).any()):
            _remove_lowest(kept, torch.where(kept, original, torch.inf), torch.where(stuck, n_rm, 0))
        bar.update(int((n_kept - kept.sum(1)).sum()))
    bar.close()
    return [(torch.stack([s[0] for s in row]), torch.stack([s[1] for s in row])) for row in snaps]


def greedy_paths(model: nn.Module, images: torch.Tensor, sparsities: Sequence[float], target="pred",
                 step: float = 0.01, continue_by_activation: bool = False, graph: Optional[ModelGraph] = None,
                 progress: bool = False) -> List[List[CriticalPath]]:
    """Greedy-pruning paths of several images at several sparsities in one run (batched).

    One pruning trajectory serves every sparsity: a step never removes more than the next
    requested level leaves room for, so the path at the lowest sparsity (90 %) is exactly what a
    run to it alone returns, and the run goes on from there to the next (99 %); a run to 99 %
    alone differs only where its step across the 90 % level is not cut there.

    Args:
        model (nn.Module): a traceable ReLU network (eval mode is set; not modified).
        images (Tensor[B, C, H, W] or [C, H, W]): finite floats, one mask per image.
        sparsities (sequence of float): each in [0, 1]; any order.
        target ("pred", int or a sequence of B of them): the class of the logit Φ per image.
        step (float): in (0, 1]: the fraction of the kept neurons removed per step (paper 1 %;
            at least one neuron).
        continue_by_activation (bool): when the non-zero scores run out, go on by original
            activation instead of stopping (see the module docstring).
        graph (ModelGraph): ``nchains.analyze(model, image)`` to reuse.
        progress (bool): a tqdm bar over the removed neurons.

    Returns:
        list per image of a list per sparsity (in the order given) of CriticalPath, method
        ``"greedy"``, ``contributions`` = the scores on the final masked network.

    Warns:
        GreedyStoppedEarly: when an image's path stopped short of a sparsity.
    """
    levels = check_sparsities(sparsities)
    step = check_positive(step, "step", 1.0)
    if not isinstance(continue_by_activation, bool):
        raise TypeError(f"continue_by_activation must be a bool, got {type(continue_by_activation).__name__}")
    batch = prepare(model, images, target, graph)
    counts = {s: kept_count(s, batch.n) for s in levels}
    goals = sorted(set(counts.values()), reverse=True)
    with torch.enable_grad():
        results = dict(zip(goals, _greedy(batch, goals, step, continue_by_activation, progress)))
    per_sparsity = [make_paths(batch, results[counts[s]][0], "greedy", s, results[counts[s]][1]) for s in levels]
    short = [(i, s, p.sparsity) for s, paths in zip(levels, per_sparsity) for i, p in enumerate(paths)
             if p.n_kept > counts[s]]
    if short:
        i, s, got = short[0]
        warnings.warn(f"greedy pruning ran out of neurons with a non-zero score before the requested sparsity at "
                      f"{len(short)} image/sparsity pair(s) (image {i}: asked {s}, reached {got:.4f}); the paths "
                      "report the sparsity reached (continue_by_activation=True goes on by original activation)",
                      GreedyStoppedEarly, stacklevel=2)
    return [[paths[i] for paths in per_sparsity] for i in range(len(batch.images))]


def greedy_pruning(model: nn.Module, image: torch.Tensor, sparsity: float, target: Union[int, str] = "pred",
                   step: float = 0.01, continue_by_activation: bool = False, graph: Optional[ModelGraph] = None,
                   progress: bool = False) -> CriticalPath:
    """Algorithm 1 of the paper: the greedy-pruning path of one image (see the module docstring).

    Args:
        model (nn.Module): a traceable ReLU network (eval mode is set; not modified).
        image (Tensor[1, C, H, W] or [C, H, W]): finite floats.
        sparsity (float): in [0, 1]; prune until ``round((1 − sparsity)·N)`` neurons are kept.
        target (int or "pred"): the class of the logit Φ.
        step (float): fraction of the kept neurons removed per step (the paper: 0.01).
        continue_by_activation (bool): see the module docstring.
        graph (ModelGraph): to reuse. progress (bool): a tqdm bar.

    Returns:
        CriticalPath (method ``"greedy"``): ``.sparsity`` is the sparsity reached, which is below
        ``.requested_sparsity`` when the non-zero scores ran out (with a GreedyStoppedEarly warning).

    Example:
        >>> path = greedy_pruning(model, image, 0.99)
        >>> path.sparsity, path.attribution().shape
    """
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] != 1:
        raise ValueError(f"image must be one image, Tensor[1, C, H, W] or [C, H, W], got shape {list(image.shape)}; "
                         "greedy_paths takes a batch")
    return greedy_paths(model, image, [sparsity], target, step, continue_by_activation, graph, progress)[0][0]
