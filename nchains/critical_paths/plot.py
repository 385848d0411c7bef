"""A PNG of an image beside its attribution map (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from typing import Optional

import torch

__all__ = ["attribution_png"]


def _shown(image: torch.Tensor):
    """Tensor[C, H, W] -> an array matplotlib shows: min-max scaled to [0, 1], gray for one channel."""
    x = image.detach().double().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)  # undoes any normalisation's scale and shift
    return (x[0].numpy(), "gray") if x.shape[0] == 1 else (x[:3].permute(1, 2, 0).numpy(), None)


def attribution_png(image: torch.Tensor, attribution: torch.Tensor, title: Optional[str] = None) -> bytes:
    """PNG bytes: the input (left) and the attribution summed over channels (right, a diverging
    map centred at 0: red raises the target logit, blue lowers it).

    Args:
        image (Tensor[1, C, H, W] or [C, H, W]): the model's input.
        attribution (Tensor of the same shape): e.g. :meth:`CriticalPath.attribution`.
        title (str): the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    image = image[0] if image.dim() == 4 else image
    attribution = attribution[0] if attribution.dim() == 4 else attribution
    heat = attribution.detach().double().sum(0).cpu().numpy()
    bound = max(float(abs(heat).max()), 1e-12)
    fig = Figure(figsize=(6.4, 3.4), dpi=100)  # a Figure of its own: no pyplot state, thread-safe
    left, right = fig.subplots(1, 2)
    shown, cmap = _shown(image)
    left.imshow(shown, cmap=cmap)
    left.set_title("input")
    im = right.imshow(heat, cmap="bwr", vmin=-bound, vmax=bound)
    right.set_title("attribution")
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.04)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: reproducible bytes
    return buf.getvalue()
