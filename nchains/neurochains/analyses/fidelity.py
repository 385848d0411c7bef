"""Fidelity vs size (NeuroChains Fig. 2 left, Fig. 13): chains extracted at several ``lam`` for
the same images, their size (filters kept) against how well they preserve the original's outputs
(probability drop of the original's class, KL), with the given chain as the operating point.

Each point is a full extraction (:func:`nchains.extract`) with the chain's own configuration
and seed, only ``lam`` changed: about 75 s on 2 cores for the shipped model at the paper's 300
steps. ``steps``/``finetune_steps`` shorten the schedule (a short schedule stops the L1 term
early, so its chains are larger than the paper's).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from nchains.neurochains.analyses._common import (DEFAULT_BATCH, build_context, check_int, check_number_list,
                                                  fidelity_numbers, logits_of)
from nchains.neurochains.config import MAX_STEPS, NeuroChainsConfig

__all__ = ["DEFAULT_FACTORS", "fidelity_vs_size", "plot_fidelity"]

#: ``lam`` of the sweep when none is given: these multiples of the chain's ``lam``.
DEFAULT_FACTORS = (0.25, 0.5, 2.0, 4.0)


def fidelity_vs_size(chain, model=None, images: Optional[torch.Tensor] = None, *,
                     lams: Optional[Sequence[float]] = None, steps: Optional[int] = None,
                     finetune_steps: Optional[int] = None, masked=None, graph=None,
                     batch_size: int = DEFAULT_BATCH, progress: bool = False) -> Dict[str, Any]:
    """Extract one chain per ``lam`` on ``images`` and measure each.

    Args:
        chain (Chain): the operating point (or a :class:`~._common.Context` of it).
        model (nn.Module): its original model.
        images (Tensor[N, *chain.input_shape]): the chain's images.
        lams (sequence of float): ``lam`` values (>= 0); default :data:`DEFAULT_FACTORS` times
            the chain's ``lam``.
        steps, finetune_steps (int): scoring / fine-tuning steps of each extraction (default:
            the chain's), in [0, 10**6].
        masked, graph, batch_size: as for :func:`~.faithfulness.faithfulness`.
        progress (bool): the extractions' progress bars.

    Returns:
        dict: ``points`` (per ``lam``, sorted: ``{lam, filters_kept, layers_kept, kl,
        agreement, prob_drop}``), ``operating_point`` (the same for the given chain),
        ``steps``, ``finetune_steps``, ``filters_total``.
    """
    from nchains.neurochains.extraction import extract

    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    cfg = NeuroChainsConfig.from_dict(ctx.chain.config)
    if lams is None:
        lams = [cfg.lam * f for f in DEFAULT_FACTORS] if cfg.lam else [0.0025, 0.005, 0.01, 0.02]
    lams = sorted(set(check_number_list("lams", lams, bound="ge0")))
    steps = cfg.steps if steps is None else check_int("steps", steps, 0, MAX_STEPS)
    finetune_steps = cfg.finetune_steps if finetune_steps is None else check_int("finetune_steps", finetune_steps,
                                                                                    0, MAX_STEPS)
    points = []
    for lam in lams:
        other = extract(ctx.model, ctx.images, cfg.replace(lam=lam, steps=steps, finetune_steps=finetune_steps),
                        progress=progress, graph=ctx.graph, model_spec=ctx.chain.model_spec)
        q = logits_of(other.apply(ctx.model, ctx.graph), ctx.images, ctx.batch_size)
        points.append({"lam": lam, "filters_kept": other.metrics["filters_kept"],
                       "layers_kept": other.metrics["layers_kept"], **fidelity_numbers(ctx.p_logits, q)})
    m = ctx.chain.metrics
    op = {"lam": cfg.lam, "filters_kept": m.get("filters_kept"), "layers_kept": m.get("layers_kept"),
          **fidelity_numbers(ctx.p_logits, ctx.q_logits)}
    return {"points": points, "operating_point": op, "steps": steps, "finetune_steps": finetune_steps,
            "filters_total": m.get("filters_total")}


def plot_fidelity(result: Dict[str, Any]):
    """Filters kept vs probability drop (left) and vs KL (right), the operating point starred.

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    fig, axes = new_figure(2)
    pts, op = result["points"], result["operating_point"]
    size = [p["filters_kept"] for p in pts]
    for ax, key, label in ((axes[0], "prob_drop", "drop of the original class's probability"),
                           (axes[1], "kl", "KL(original || chain)")):
        ax.plot(size, [p[key] for p in pts], "o-", color="tab:blue", ms=4, label="sweep over lam")
        for p in pts:
            ax.annotate(f"{p['lam']:.3g}", (p["filters_kept"], p[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.plot([op["filters_kept"]], [op[key]], "*", color="tab:red", ms=12,
                label=f"operating point (lam {op['lam']:.3g})")
        ax.set_xlabel("filters kept")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title(f"Fidelity vs size: probability drop ({result['steps']} steps)", fontsize=10)
    axes[1].set_title("Fidelity vs size: KL", fontsize=10)
    return fig
