"""Faithfulness (NeuroChains Fig. 2 right, Fig. 8 right, Fig. 16): remove each kept filter of a
chain in turn and measure the damage; a faithful score predicts it.

Batched: the filter dimension is folded into the batch. One forward runs ``V`` variants of the
chain on the ``N`` images at once (``V * N`` rows); a forward hook on each scored unit sets, in
the rows of the variants that remove one of its filters, that filter's output to what a zero
score gives (``act(0 * z) = act(0)``: 0 for ReLU and linear units). A score multiplies the
filter's whole pre-activation (BN bias included), so this is exactly the chain with that filter's
score set to 0, for any elementwise activation.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from nchains.neurochains.analyses._common import (DEFAULT_BATCH, build_context, check_batch_size, json_float,
                                                  progress_bar)
from nchains.neurochains.analyses.ranks import pearson, spearman

__all__ = ["faithfulness", "plot_faithfulness", "removable_filters"]


def removable_filters(chain) -> List[Tuple[str, int, float]]:
    """``(layer, filter, score)`` of every kept filter the chain computes, in layer order: kept
    filters inside a removed region (gate 0) are never run, so removing them changes nothing and
    they are left out."""
    removed_layers = {layer for region, info in chain.regions.items() if not chain.gates.get(region, 1)
                      for layer in info.get("layers", [])}
    return [(layer, int(i), float(s)) for layer, idx in chain.kept.items() if layer not in removed_layers
            for i, s in zip(idx, chain.scores[layer])]


def _zero_score_value(unit, out: torch.Tensor) -> torch.Tensor:
    """What the unit outputs where its score is 0: ``act(0)`` (a 0-d tensor)."""
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    act = getattr(unit, "act", None)
    if getattr(unit, "fused", False) or act is None:  # fused units: ReLU or no activation
        return zero
    return act(zero.clone())


def _variant_logits(ctx, variants: List[Tuple[str, int]]) -> torch.Tensor:
    """Logits ``Tensor[V, N, classes]`` of the chain with each variant's filter removed."""
    n, v = len(ctx.images), len(variants)
    by_layer: Dict[str, List[Tuple[int, int]]] = {}
    for j, (layer, f) in enumerate(variants):
        by_layer.setdefault(layer, []).append((j, f))
    hooks = []

    def hook(layer):
        def fn(mod, inp, out):
            out = out.clone()
            fill = _zero_score_value(mod, out)
            for j, f in by_layer[layer]:
                out[j * n:(j + 1) * n, f] = fill
            return out
        return fn

    for layer in by_layer:
        hooks.append(ctx.masked.unit(layer).register_forward_hook(hook(layer)))
    try:
        with torch.no_grad():
            x = ctx.images.repeat(v, *([1] * (ctx.images.dim() - 1)))
            out = ctx.masked(x)
    finally:
        for h in hooks:
            h.remove()
    return out.reshape(v, n, -1)


def faithfulness(chain, model=None, images: Optional[torch.Tensor] = None, *, masked=None, graph=None,
                 batch_size: int = DEFAULT_BATCH, progress: bool = False) -> Dict[str, Any]:
    """The damage of removing each kept filter from the chain, and its correlation with the score.

    For filter ``f`` and image ``n`` with ``y_n`` = the original model's class, ``q`` the chain's
    softmax and ``q_-f`` the chain's without ``f``:

    - ``damage`` = mean_n ``q[n, y_n] - q_-f[n, y_n]`` (Fig. 2 right: drop of the original
      class's probability);
    - ``changed`` = fraction of images where ``argmax q_-f != y_n`` (Fig. 8 right: the quotient
      metric's sign turns negative);
    - ``kl`` = mean_n KL(q || q_-f) (Fig. 16).

    Args:
        chain (Chain): the chain (or a :class:`~._common.Context` of it).
        model (nn.Module): its original model.
        images (Tensor[N, *chain.input_shape]): the chain's images.
        masked, graph: ``chain.apply(model)`` and the model's analysis, to reuse (optional).
        batch_size (int): rows (variants x images) per forward; at least one variant per forward.
        progress (bool): a progress bar over the variants.

    Returns:
        dict: ``filters`` (list of ``{layer, label, filter, score, damage, changed, kl}``),
        ``spearman`` (Spearman's rho of score vs damage), ``spearman_abs`` (of |score| vs damage),
        ``pearson``, ``reference_prob`` (mean ``q[n, y_n]`` of the intact chain), ``images``.
        Correlations are None with fewer than 2 filters or a constant column.
    """
    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    chain = ctx.chain
    filters = removable_filters(chain)
    n = len(ctx.images)
    per_forward = max(1, check_batch_size(batch_size) // n)
    y = ctx.predicted
    q_logp = F.log_softmax(ctx.q_logits.double(), 1)
    q_y = q_logp.exp().gather(1, y[:, None]).squeeze(1)
    rows = []
    bar = progress_bar(len(filters), "faithfulness", progress)
    try:
        for start in range(0, len(filters), per_forward):
            part = filters[start:start + per_forward]
            out = _variant_logits(ctx, [(layer, f) for layer, f, _ in part]).double()
            r_logp = F.log_softmax(out, 2)
            r_y = r_logp.exp().gather(2, y.expand(len(part), n)[..., None]).squeeze(2)
            damage = (q_y[None] - r_y).mean(1)
            changed = (out.argmax(2) != y[None]).double().mean(1)
            kl = (q_logp.exp()[None] * (q_logp[None] - r_logp)).sum(2).mean(1)
            for k, (layer, f, score) in enumerate(part):
                rows.append({"layer": layer, "label": chain.filter_label(layer, f), "filter": f, "score": score,
                             "damage": float(damage[k]), "changed": float(changed[k]), "kl": float(kl[k])})
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
    scores = [r["score"] for r in rows]
    damages = [r["damage"] for r in rows]
    return {
        "filters": rows,
        "spearman": spearman(scores, damages),
        "spearman_abs": spearman([abs(s) for s in scores], damages),
        "pearson": pearson(scores, damages),
        "reference_prob": json_float(q_y.mean()),
        "images": n,
    }


def plot_faithfulness(result: Dict[str, Any]):
    """Scatter of filter score vs damage, with the least-squares line (Fig. 2 right).

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure, fmt

    fig, (ax, ax2) = new_figure(2)
    rows = result["filters"]
    s = [r["score"] for r in rows]
    d = [r["damage"] for r in rows]
    c = [r["changed"] for r in rows]
    ax.scatter(s, d, s=12, alpha=0.6, color="tab:blue", edgecolors="none")
    if len(set(s)) > 1:
        import numpy as np

        slope, icept = np.polyfit(s, d, 1)
        xs = np.linspace(min(s), max(s), 50)
        ax.plot(xs, slope * xs + icept, color="magenta", lw=1.5,
                label=f"least squares (Pearson r = {fmt(result['pearson'])})")
        ax.legend(loc="upper left", fontsize=8)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("score of the removed filter")
    ax.set_ylabel("drop of the original class's probability")
    ax.set_title(f"Faithfulness: damage of removing one filter (Spearman ρ = {fmt(result['spearman'])})", fontsize=10)
    ax2.scatter(s, c, s=12, alpha=0.6, color="tab:red", edgecolors="none")
    ax2.set_xlabel("score of the removed filter")
    ax2.set_ylabel("fraction of images whose class changes")
    ax2.set_title("Faithfulness: prediction changes (quotient < 0)", fontsize=10)
    return fig
