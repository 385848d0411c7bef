"""The quotient metric of NeuroChains (Eq. 9, Fig. 8 left): per image, how the chain changes the
margin of the original model's class over the strongest other class.

    Q(p, q) = (q[y] - max_{z != y} q[z]) / (p[y] - max_{z != y} p[z]),   y = argmax p

with ``p`` the original model's and ``q`` the chain's softmax. ``Q < 0``: the chain predicts
another class; ``Q > 1``: the chain is more confident than the original.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from nchains.neurochains.analyses._common import DEFAULT_BATCH, build_context, json_float

__all__ = ["margin", "plot_quotient", "quotient", "quotient_values"]


def margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``probs[n, y_n] - max_{z != y_n} probs[n, z]`` per row.

    Args:
        probs (Tensor[N, classes]): probabilities, at least 2 classes.
        y (Tensor[N]): a class per row.

    Returns:
        Tensor[N].
    """
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape [N, classes >= 2], got {tuple(probs.shape)}")
    own = probs.gather(1, y[:, None]).squeeze(1)
    others = probs.scatter(1, y[:, None], float("-inf")).amax(1)
    return own - others


def quotient_values(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Q(p, q) per image, in float64 (NaN where the original's margin is 0: a tie).

    Args:
        p_logits (Tensor[N, classes]): the original model's logits.
        q_logits (Tensor[N, classes]): the chain's logits on the same images.
    """
    p = torch.softmax(p_logits.double(), 1)
    q = torch.softmax(q_logits.double(), 1)
    y = p.argmax(1)
    den = margin(p, y)
    return torch.where(den > 0, margin(q, y) / den, torch.full_like(den, float("nan")))


def quotient(chain, model=None, images: Optional[torch.Tensor] = None, *, masked=None, graph=None,
             batch_size: int = DEFAULT_BATCH, progress: bool = False) -> Dict[str, Any]:
    """Q(p, q) of Eq. 9 on every image of the chain.

    Args:
        chain (Chain): the chain (or a :class:`~._common.Context` of it).
        model (nn.Module): its original model.
        images (Tensor[N, *chain.input_shape]): the chain's images.
        masked, graph, batch_size: as for :func:`~.faithfulness.faithfulness`.
        progress (bool): unused (one batched forward per model).

    Returns:
        dict: ``q`` (Q per image; None for a tie of the original's top two classes), ``changed``
        (per image: ``Q < 0``, the chain's class differs), ``fraction_negative``, ``median``,
        ``mean``, ``images``.
    """
    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    q = quotient_values(ctx.p_logits, ctx.q_logits)
    finite = q[torch.isfinite(q)]
    return {
        "q": [json_float(v) for v in q.tolist()],
        "changed": [bool(v < 0) for v in q.tolist()],
        "fraction_negative": json_float((finite < 0).double().mean()) if len(finite) else None,
        "median": json_float(finite.median()) if len(finite) else None,
        "mean": json_float(finite.mean()) if len(finite) else None,
        "images": len(q),
    }


def plot_quotient(result: Dict[str, Any]):
    """Histogram of Q over the images, ``Q = 0`` (class change) and ``Q = 1`` (same margin) marked.

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import fmt, new_figure

    fig, ax = new_figure(1)
    values = [v for v in result["q"] if v is not None]
    if values:
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="tab:red", lw=1, ls="--", label="Q = 0 (class changes below)")
    ax.axvline(1, color="0.4", lw=1, ls=":", label="Q = 1 (same margin)")
    ax.legend(fontsize=8)
    ax.set_xlabel("Q(p, q): chain's margin / original's margin")
    ax.set_ylabel("images")
    ax.set_title(f"Quotient metric Q(p, q) (Eq. 9): {fmt(result['fraction_negative'])} negative", fontsize=10)
    return fig
