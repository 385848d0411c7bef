"""Input degradation (Samek et al. 2017; paper 2, Sec. 3.3, Fig. 6a-c): replace the pixels of an
image in the order of their attribution, in growing fractions, and record the target's output.

*Ranking.* A pixel's relevance is its attribution summed over channels (an RGB map ranks pixels,
not channel values; ``absolute=True`` ranks by the magnitude of that sum). LeRF removes the
least relevant pixels first, MoRF the most relevant first; ties are broken by pixel index
(row-major), so the order is deterministic. At fraction ``f`` the first ``round(f * H * W)``
pixels of the order are replaced, in every channel.

*Fill* (the value a removed pixel takes, in the model's input space, i.e. after preprocessing):
``"zero"``: 0 (for standardised inputs such as the shipped model's, 0 is the dataset's mean
pixel); ``"mean"``: the image's own per-channel mean; ``"blur"``: the same pixel of a Gaussian-
blurred copy of the image (``blur_sigma`` pixels, kernel ±3σ, mirrored borders as scipy.ndimage).

*Output.* Per fraction and image: the target logit Φ, the target probability (softmax) and the
absolute fractional change ``|Φ(x̃) − Φ(x)| / |Φ(x)|`` (the paper's Fig. 6 / Table 2 measure);
for each the mean curve and its AUC by the trapezoid rule over the fractions (not rescaled: with
fractions spanning [0, 1] it is the curve's average). All degraded copies of the images go
through the model in batches of ``batch_size`` (several fractions of one image in one forward).

Example:
    >>> r = lerf(model, images, attributions, fractions=[0, .25, .5, .75, 1], fill="zero")
    >>> r["auc"]["change"], r["change"]["mean"]
    >>> plot_degradation({"intgrad": r, "gradient": r2}, path="lerf.png")
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.io import PathLike
from nchains._util.tensors import check_images
from nchains.metrics._common import check_fractions, check_map, check_targets, pixel_scores, save_png

__all__ = ["DEFAULT_FRACTIONS", "FILLS", "degrade", "fill_values", "lerf", "morf", "plot_degradation",
           "removal_ranks"]

#: Fractions of pixels removed by default: 0, 0.05, ..., 1.
DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(21))
FILLS = ("zero", "mean", "blur")


def _mirror_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``radius`` reflected values on each side
    (``d c b | a b c d | c b a``, scipy's "mirror"), for any radius, even one beyond ``n``."""
    idx = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of Tensor[N, C, H, W]: kernel radius ``int(3σ + 0.5)``, mirrored
    borders (as ``scipy.ndimage.gaussian_filter(mode="mirror", truncate=3)``)."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    flat = flat[:, :, _mirror_index(h, radius, images.device)][..., _mirror_index(w, radius, images.device)]
    flat = torch.nn.functional.conv2d(flat, k.view(1, 1, 1, -1))
    flat = torch.nn.functional.conv2d(flat, k.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def fill_values(images: torch.Tensor, fill: str = "zero", blur_sigma: float = 2.0) -> torch.Tensor:
    """The value every pixel takes when removed (see the module docstring).

    Args:
        images (Tensor[N, C, H, W]): the inputs.
        fill (str): ``"zero"``, ``"mean"`` or ``"blur"``.
        blur_sigma (float): the blur's standard deviation in pixels, > 0 (``"blur"`` only).

    Returns:
        Tensor[N, C, H, W] like ``images``.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not 0 < blur_sigma <= 1e3:
        raise ValueError(f"blur_sigma must be a number in (0, 1000], got {blur_sigma!r}")
    if fill == "zero":
        return torch.zeros_like(images)
    if fill == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    return _gaussian_blur(images, float(blur_sigma))


def removal_ranks(attributions: torch.Tensor, order: str = "lerf", absolute: bool = False) -> torch.Tensor:
    """The position of every pixel in the removal order.

    Args:
        attributions (Tensor[N, C, H, W]): the maps (summed over channels to rank pixels).
        order (str): ``"lerf"`` (lowest score first) or ``"morf"`` (highest first).
        absolute (bool): rank by ``|sum over channels|``.

    Returns:
        LongTensor[N, H*W]: 0 for the pixel removed first; ties in pixel-index order.
    """
    if order not in ("lerf", "morf"):
        raise ValueError(f"order must be 'lerf' or 'morf', got {order!r}")
    s = pixel_scores(attributions, absolute)
    s = s if order == "lerf" else -s
    position = torch.argsort(s, dim=1, stable=True)
    ranks = torch.empty_like(position)
    ranks.scatter_(1, position, torch.arange(s.shape[1], device=s.device).expand_as(position).contiguous())
    return ranks


def degrade(images: torch.Tensor, ranks: torch.Tensor, counts: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Images with their first ``counts`` pixels (by ``ranks``) replaced by ``fill``.

    Args:
        images, fill (Tensor[B, C, H, W]); ranks (LongTensor[B, H*W]); counts (LongTensor[B]).

    Returns:
        Tensor[B, C, H, W].
    """
    b, c, h, w = images.shape
    removed = (ranks < counts.view(-1, 1)).view(b, 1, h, w)
    return torch.where(removed, fill, images)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _curves(values: np.ndarray, fractions: Sequence[float]) -> Dict[str, Any]:
    """Mean curve, per-image curves and trapezoid AUCs of values[N, F]."""
    f = np.asarray(fractions, dtype=np.float64)
    mean = values.mean(0)
    per_auc = np.trapezoid(values, f, axis=1) if len(f) > 1 else np.zeros(len(values))
    return {"mean": mean.tolist(), "per_image": values.tolist(),
            "auc": float(np.trapezoid(mean, f)) if len(f) > 1 else 0.0, "auc_per_image": per_auc.tolist()}


def _degradation(model, images, attributions, fractions, fill, target, order, absolute, blur_sigma,
                 batch_size, progress) -> Dict[str, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(images)
    fractions = check_fractions(DEFAULT_FRACTIONS if fractions is None else fractions)
    if not isinstance(absolute, bool):
        raise TypeError(f"absolute must be a bool, got {type(absolute).__name__}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    device, dtype = model_device_dtype(model)
    x = images.detach().to(device, dtype)
    attributions = check_map(attributions, x)
    fills = fill_values(x, fill, blur_sigma)
    ranks = removal_ranks(attributions, order, absolute)
    model.eval()
    with torch.no_grad():
        base = model(x)
    if base.dim() != 2:
        raise ValueError(f"model must return logits Tensor[N, K], got shape {list(base.shape)}")
    t = check_targets(target, base)
    n, (h, w) = len(x), x.shape[2:]
    counts = torch.tensor([int(round(f * h * w)) for f in fractions], device=device)
    pairs = n * len(fractions)
    img = torch.arange(n, device=device).repeat_interleave(len(fractions))
    frac = torch.arange(len(fractions), device=device).repeat(n)
    logit = torch.empty(pairs, dtype=torch.float64)
    prob = torch.empty(pairs, dtype=torch.float64)
    from tqdm.auto import tqdm

    bar = tqdm(total=pairs, desc=f"{order} ({fill})", unit="img", disable=not progress, leave=False)
    with torch.no_grad():
        for s in range(0, pairs, batch_size):
            i, j = img[s:s + batch_size], frac[s:s + batch_size]
            out = model(degrade(x[i], ranks[i], counts[j], fills[i]))
            rows = torch.arange(len(i), device=device)
            logit[s:s + len(i)] = out[rows, t[i]].double().cpu()
            prob[s:s + len(i)] = out.double().softmax(1)[rows, t[i]].cpu()
            bar.update(len(i))
    bar.close()
    logit = logit.view(n, len(fractions)).numpy()
    prob = prob.view(n, len(fractions)).numpy()
    phi = base[torch.arange(n), t].double().cpu().numpy()[:, None]
    change = np.abs(logit - phi) / np.maximum(np.abs(phi), np.finfo(np.float64).tiny)
    curves = {"logit": _curves(logit, fractions), "probability": _curves(prob, fractions),
              "change": _curves(change, fractions)}
    return {"order": order, "fill": fill, "absolute": absolute, "fractions": list(fractions),
            "targets": t.tolist(), "original_logit": phi[:, 0].tolist(), **curves,
            "auc": {k: c["auc"] for k, c in curves.items()}}


def lerf(model: nn.Module, images: torch.Tensor, attributions: torch.Tensor,
         fractions: Optional[Sequence[float]] = None, fill: str = "zero",
         target: Union[str, int, Sequence[int], torch.Tensor] = "pred", *, absolute: bool = False,
         blur_sigma: float = 2.0, batch_size: int = 256, progress: bool = False) -> Dict[str, Any]:
    """Input degradation, least relevant pixels first (LeRF).

    A good attribution leaves the output nearly unchanged while its least relevant pixels go:
    lower ``change`` curves / AUCs are better.

    Args:
        model (nn.Module): maps Tensor[N, C, H, W] to logits Tensor[N, K] (eval mode is set).
        images (Tensor[N, C, H, W]): finite floats, moved to the model's device and dtype.
        attributions (Tensor[N, C or 1, H, W] or [N, H, W]): one finite map per image.
        fractions (sequence of float): strictly increasing in [0, 1]; default
            :data:`DEFAULT_FRACTIONS`.
        fill (str): ``"zero"``, ``"mean"`` or ``"blur"`` (module docstring).
        target ("pred", int, or N ints): the class per image; ``"pred"``: the original argmax.
        absolute (bool): rank pixels by the magnitude of their summed attribution.
        blur_sigma (float): pixels, for ``fill="blur"``.
        batch_size (int): degraded images per forward.
        progress (bool): a tqdm bar.

    Returns:
        dict: ``fractions``, ``targets``, ``original_logit`` (N), and for each of ``logit``,
        ``probability``, ``change``: ``{"mean": [F], "per_image": [N][F], "auc", "auc_per_image"}``;
        ``auc``: the three mean-curve AUCs; ``order``, ``fill``, ``absolute``.

    Raises:
        TypeError, ValueError: on any bad argument (checked before the forwards).
    """
    return _degradation(model, images, attributions, fractions, fill, target, "lerf", absolute, blur_sigma,
                        batch_size, progress)


def morf(model: nn.Module, images: torch.Tensor, attributions: torch.Tensor,
         fractions: Optional[Sequence[float]] = None, fill: str = "zero",
         target: Union[str, int, Sequence[int], torch.Tensor] = "pred", *, absolute: bool = False,
         blur_sigma: float = 2.0, batch_size: int = 256, progress: bool = False) -> Dict[str, Any]:
    """Input degradation, most relevant pixels first (MoRF): :func:`lerf` with the order reversed.
    A good attribution makes the target's output fall fast: lower ``logit`` AUCs are better."""
    return _degradation(model, images, attributions, fractions, fill, target, "morf", absolute, blur_sigma,
                        batch_size, progress)


def plot_degradation(results: Mapping[str, Mapping[str, Any]], quantity: str = "change",
                     path: Optional[PathLike] = None):
    """Mean degradation curves of several attribution methods (Fig. 6a-c), AUCs in the legend
    (beside the axes, lowest AUC first; a colour per method, up to 20 distinct).

    Args:
        results (mapping name -> dict of :func:`lerf` / :func:`morf`).
        quantity (str): ``"change"``, ``"logit"`` or ``"probability"``.
        path (str or PathLike): where to write the PNG (atomically); None: only return the figure.

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    if quantity not in ("change", "logit", "probability"):
        raise ValueError(f"quantity must be 'change', 'logit' or 'probability', got {quantity!r}")
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping name -> lerf/morf result")
    import matplotlib

    # lowest AUC first, each method its own colour (tab20 beyond ten), the legend beside the axes
    ranked = sorted(results.items(), key=lambda kv: kv[1][quantity]["auc"])
    colours = matplotlib.colormaps["tab10" if len(ranked) <= 10 else "tab20"].colors
    fig, ax = new_figure(1, width=8.0)
    orders = set()
    for i, (name, r) in enumerate(ranked):
        c = r[quantity]
        ax.plot(r["fractions"], c["mean"], "o-", ms=3, color=colours[i % len(colours)],
                label=f"{name} (AUC {c['auc']:.3g})")
        orders.add(f"{ {'lerf': 'LeRF', 'morf': 'MoRF'}.get(r['order'], r['order'])}, fill {r['fill']}")
    ylabel = {"change": "|Φ(x̃) − Φ(x)| / |Φ(x)|", "logit": "target logit Φ(x̃)",
              "probability": "target probability"}[quantity]
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Input degradation ({'; '.join(sorted(orders))})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="lowest AUC first",
              title_fontsize=8)
    return save_png(fig, path)
