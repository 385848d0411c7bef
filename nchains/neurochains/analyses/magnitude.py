"""A magnitude-pruning baseline beside NeuroChains (the paper's Fig. 12 comparison).

The baseline keeps, in every layer, as many filters as the chain does (so the same total and the
same per-layer sizes), chosen by the L1 norm of their conv weights ``sum |W[f]|`` (Li et al.,
"Pruning filters for efficient ConvNets"; the weights the conv computes with, before BatchNorm;
ties broken by the lower index). It keeps the chain's gates (the same blocks are removed), starts
from scores 1 and, like NeuroChains, fine-tunes the kept scores on the KL alone with the chain's
``finetune_lr``/``finetune_steps`` (``finetune=False`` skips it). The paper's own baseline
ranks filters by feature-map magnitude instead; the weight norm needs no data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from nchains.graph.analysis import ConvUnit
from nchains.neurochains.analyses._common import (DEFAULT_BATCH, build_context, check_int, fidelity_numbers,
                                                  logits_of)
from nchains.neurochains.config import MAX_STEPS, NeuroChainsConfig

__all__ = ["magnitude_baseline", "magnitude_chain", "plot_magnitude", "weight_norms"]


def weight_norms(graph, layer: str) -> torch.Tensor:
    """``Tensor[C_out]`` (float64): the L1 norm of each filter's weights in ``layer``."""
    gm = graph.graph_module
    if layer in graph.layers:
        unit: ConvUnit = graph.layers[layer]
        weight = unit.params(gm).weight
    else:  # a scored hidden Linear (score_linear chains)
        weight = gm.get_submodule(graph.linears[layer].first.target).weight
    return weight.detach().double().abs().flatten(1).sum(1).cpu()


def magnitude_chain(chain, graph):
    """The chain with, per layer, its kept count of the largest-norm filters at score 1 (same
    gates, metrics copied from the chain until measured)."""
    kept: Dict[str, List[int]] = {}
    for layer, idx in chain.kept.items():
        norms = weight_norms(graph, layer)
        order = sorted(range(len(norms)), key=lambda i: (-float(norms[i]), i))
        kept[layer] = sorted(order[:len(idx)])
    scores = {layer: [1.0] * len(idx) for layer, idx in kept.items()}
    return dataclasses.replace(chain, kept=kept, scores=scores, strongest_filters={}, history={})


def _finetune(sm, images, p_logits, chain, steps: Optional[int], progress: bool) -> int:
    from nchains.neurochains.extraction import _finetune as finetune_scores

    cfg = NeuroChainsConfig.from_dict(chain.config)
    if steps is not None:
        cfg = cfg.replace(finetune_steps=check_int("finetune_steps", steps, 0, MAX_STEPS))
    if cfg.finetune_steps == 0:
        return 0
    sm.train()
    try:
        history = finetune_scores(sm, images, F.log_softmax(p_logits, 1), cfg, progress)
    finally:
        sm.eval()
    return len(history)


def magnitude_baseline(chain, model=None, images: Optional[torch.Tensor] = None, *, finetune: bool = True,
                       finetune_steps: Optional[int] = None, masked=None, graph=None,
                       batch_size: int = DEFAULT_BATCH, progress: bool = False
                       ) -> Dict[str, Any]:
    """KL, agreement and probability drop of the chain and of the magnitude baseline.

    Args:
        chain (Chain): the chain (or a :class:`~._common.Context` of it).
        model (nn.Module): its original model.
        images (Tensor[N, *chain.input_shape]): the chain's images (the baseline is fine-tuned
            and measured on them, as the chain was).
        finetune (bool): fine-tune the baseline's scores (see the module docstring).
        finetune_steps (int): its Adam steps, in [0, 10**6] (default: the chain's ``finetune_steps``).
        masked, graph, batch_size: as for :func:`~.faithfulness.faithfulness`.
        progress (bool): the fine-tuning's progress bar.

    Returns:
        dict: ``neurochains``, ``magnitude`` (scores 1) and ``magnitude_finetuned`` (when
        fine-tuned): ``{kl, agreement, prob_drop}``; ``kept`` (layer -> the baseline's filters),
        ``filters_kept``, ``overlap`` (filters both keep), ``finetune_steps_run``.
    """
    if not isinstance(finetune, bool):
        raise TypeError(f"finetune must be True or False, got {finetune!r}")
    if finetune_steps is not None:
        check_int("finetune_steps", finetune_steps, 0, MAX_STEPS)
    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    base = magnitude_chain(ctx.chain, ctx.graph)
    sm = base.apply(ctx.model, ctx.graph)
    result = {"neurochains": fidelity_numbers(ctx.p_logits, ctx.q_logits),
              "magnitude": fidelity_numbers(ctx.p_logits, logits_of(sm, ctx.images, ctx.batch_size)),
              "kept": base.kept, "filters_kept": sum(len(v) for v in base.kept.values()),
              "overlap": len(base.filters() & ctx.chain.filters()), "finetune_steps_run": 0}
    if finetune:
        result["finetune_steps_run"] = _finetune(sm, ctx.images, ctx.p_logits, ctx.chain, finetune_steps,
                                                  progress)
        result["magnitude_finetuned"] = fidelity_numbers(ctx.p_logits, logits_of(sm, ctx.images, ctx.batch_size))
    return result


def plot_magnitude(result: Dict[str, Any]):
    """Bars of KL and agreement: NeuroChains vs the magnitude baseline.

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    fig, (ax, ax2) = new_figure(2, width=4.2)
    keys = [k for k in ("neurochains", "magnitude", "magnitude_finetuned") if k in result]
    names = {"neurochains": "NeuroChains", "magnitude": "magnitude", "magnitude_finetuned": "magnitude\nfine-tuned"}
    colours = {"neurochains": "tab:blue", "magnitude": "tab:gray", "magnitude_finetuned": "tab:orange"}
    x = range(len(keys))
    for axis, metric, label in ((ax, "kl", "KL(original || sub-network)"), (ax2, "agreement", "agreement")):
        vals = [result[k][metric] for k in keys]
        axis.bar(x, vals, color=[colours[k] for k in keys])
        axis.set_xticks(list(x), [names[k] for k in keys], fontsize=8)
        for i, v in enumerate(vals):
            axis.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        axis.set_ylabel(label)
    ax2.set_ylim(0, 1.1)
    ax.set_title(f"Magnitude baseline vs NeuroChains ({result['filters_kept']} filters each)", fontsize=10)
    ax2.set_title("Agreement with the original's class", fontsize=10)
    return fig
