"""The model-randomisation sanity check (Adebayo et al. 2018; paper 2, Sec. 3.3, App. C.1, Fig. 7).

Cascading randomisation from the top: on a deep copy of the model, the parametrised layers are
re-initialised one at a time from the output down (weights and biases drawn from N(0, std²);
the paper: variance 0.01, i.e. ``std=0.1``), each step keeping the layers above it random, and
the attributions of the same images and the same target classes are recomputed after each step.
A method that explains the model must change as its weights go: its maps should become
dissimilar to the original ones.

Similarities, per image, between the original map and the map after each step. Maps are summed
over channels to [H, W] and normalised to [−1, 1] by their largest magnitude (App. C.1):

- ``spearman``: Spearman rank correlation of the signed maps (``scipy.stats.spearmanr``);
- ``spearman_abs``: the same of their absolute values;
- ``ssim``: :func:`nchains.metrics.ssim.ssim` of the signed normalised maps (``data_range=2``,
  skimage's default uniform 7×7 window).

A map that is constant (e.g. all zero once a randomised layer kills every activation) has no
rank correlation: it is reported as None and left out of the means.

Example:
    >>> def gradient(model, images, targets):
    ...     x = images.clone().requires_grad_(True)
    ...     return torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)[0]
    >>> r = randomisation_sanity(gradient, model, images[:8])
    >>> r["layers"][0], r["spearman"][0]              # 'fc', 0.2
    >>> plot_sanity({"gradient": r}, path="sanity.png")
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.io import PathLike
from nchains._util.tensors import check_images
from nchains.metrics._common import check_map, check_targets, save_png
from nchains.metrics.ssim import ssim

__all__ = ["LAYER_TYPES", "randomisation_sanity", "randomisable_layers", "plot_sanity"]

#: The layer types re-initialised by default: those that hold the network's learned mapping.
#: BatchNorm is left as it is (its statistics and affine scale each filter; a randomised conv
#: already makes the filter random).
LAYER_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def randomisable_layers(model: nn.Module, images: torch.Tensor,
                        layer_types: Sequence[type] = LAYER_TYPES) -> List[str]:
    """Module paths of ``model``'s layers of ``layer_types``, in the order one forward first calls
    them (found with forward hooks on the given images' first item)."""
    order: List[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, tuple(layer_types)) and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def _normalised(maps: torch.Tensor) -> np.ndarray:
    """Tensor[N, C, H, W] -> float64 [N, H, W] summed over channels, scaled to [−1, 1] per image."""
    m = maps.detach().double().sum(1).cpu().numpy()
    peak = np.abs(m).reshape(len(m), -1).max(1)
    return m / np.where(peak > 0, peak, 1.0)[:, None, None]


def _spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    from scipy.stats import spearmanr

    a, b = a.ravel(), b.ravel()
    if np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return float(spearmanr(a, b).statistic)


def _similarities(before: np.ndarray, after: np.ndarray) -> Dict[str, List[Optional[float]]]:
    s = ssim(torch.from_numpy(before), torch.from_numpy(after), data_range=2.0)
    return {"spearman": [_spearman(x, y) for x, y in zip(before, after)],
            "spearman_abs": [_spearman(np.abs(x), np.abs(y)) for x, y in zip(before, after)],
            "ssim": [float(v) for v in s]}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def _attributions(method, model, x, targets, what: str) -> torch.Tensor:
    out = method(model, x, targets)
    return check_map(out, x, name=f"method's attributions ({what})")


def randomisation_sanity(method: Callable, model: nn.Module, images: torch.Tensor, target="pred", *,
                         layers: Optional[Sequence[str]] = None, std: float = 0.1, seed: int = 0,
                         progress: bool = False) -> Dict[str, Any]:
    """Cascading model randomisation, top layer first; similarity of attributions after each step.

    Args:
        method (callable): ``method(model, images, targets) -> Tensor[N, C or 1, H, W]`` with
            ``targets`` LongTensor[N]; called on the original model once, then on the
            randomised copy after each step.
        model (nn.Module): the network; never modified (the steps work on a deep copy).
        images (Tensor[N, C, H, W]): finite floats, H and W >= 7 (SSIM's window).
        target ("pred", int or N ints): the classes explained, fixed for every step
            (``"pred"``: the original model's argmax).
        layers (sequence of str): module paths to randomise, top first; default every Conv/Linear
            of :data:`LAYER_TYPES` in reverse call order.
        std (float): standard deviation of the re-initialisation N(0, std²), > 0.
        seed (int): seeds the draws (a generator of its own; the global RNG is untouched).
        progress (bool): a tqdm bar over the steps.

    Returns:
        dict: ``layers`` (randomised at each step, top first), ``spearman``, ``spearman_abs``,
        ``ssim`` (mean over images per step; None where undefined), ``per_image`` (list per step
        of ``{"spearman": [N], "spearman_abs": [N], "ssim": [N]}``), ``targets``, ``std``, ``seed``.

    Raises:
        TypeError, ValueError: a bad argument, an unknown layer, or a method whose maps do not
            fit the images.
    """
    if not callable(method):
        raise TypeError(f"method must be a callable (model, images, targets) -> attributions, got "
                        f"{type(method).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(images)
    if min(images.shape[2:]) < 7:
        raise ValueError(f"images must be at least 7x7 (SSIM's window), got {list(images.shape[2:])}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a finite number > 0, got {std!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    device, dtype = model_device_dtype(model)
    x = images.detach().to(device, dtype)
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    if layers is None:
        layers = list(reversed(randomisable_layers(work, x)))
    else:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of module paths, got {layers!r}")
        bad = [n for n in layers if not isinstance(n, str) or n not in modules
               or not any(True for _ in modules[n].parameters(recurse=False))]
        if bad:
            raise ValueError(f"layers: {bad[0]!r} is not a module of the model with parameters of its own")
        layers = list(layers)
    if not layers:
        raise ValueError("model has no Conv/Linear layer to randomise; pass layers=")
    with torch.no_grad():
        targets = check_targets(target, work(x))
    original = _normalised(_attributions(method, work, x, targets, "original model"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    steps = []
    from tqdm.auto import tqdm

    for name in tqdm(layers, desc="randomising", unit="layer", disable=not progress, leave=False):
        with torch.no_grad():
            for p in modules[name].parameters(recurse=False):
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * std).to(p))
        steps.append(_similarities(original, _normalised(_attributions(method, work, x, targets, name))))
    return {"layers": layers, **{k: [_mean(s[k]) for s in steps] for k in ("spearman", "spearman_abs", "ssim")},
            "per_image": steps, "targets": targets.tolist(), "std": float(std), "seed": seed}


def plot_sanity(results: Mapping[str, Mapping[str, Any]], path: Optional[PathLike] = None):
    """Similarity to the original maps vs layers randomised (Fig. 7): one panel each for the
    signed Spearman, absolute Spearman and SSIM, one line per method, a dotted line at 1 (the
    original maps against themselves).

    Args:
        results (mapping name -> dict of :func:`randomisation_sanity`).
        path (str or PathLike): where to write the PNG (atomically); None: only return the figure.

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping name -> randomisation_sanity result")
    fig, axes = new_figure(3, width=4.6)
    titles = {"spearman": "Spearman (signed)", "spearman_abs": "Spearman (absolute)", "ssim": "SSIM"}
    for ax, (key, title) in zip(axes, titles.items()):
        for name, r in results.items():
            ys = [np.nan if v is None else v for v in r[key]]
            ax.plot(range(1, len(ys) + 1), ys, "o-", ms=3, label=name)
        layers = next(iter(results.values()))["layers"]
        ax.set_xticks(range(1, len(layers) + 1), layers, rotation=60, ha="right", fontsize=6)
        ax.axhline(1.0, color="0.6", ls=":", lw=1)  # a map against itself: before any randomisation
        ax.text(len(layers), 1.0, "original maps", fontsize=6, color="0.4", ha="right", va="bottom")
        ax.set_xlabel("randomised down to layer")
        ax.set_ylabel(f"{title} to the original")
        ax.set_ylim(-1.05, 1.12)
        ax.set_title(f"Randomisation sanity check: {title}", fontsize=9)
    axes[0].legend(fontsize=7)
    return save_png(fig, path)
