"""What the metrics share: a path given as a CriticalPath or as a plain mask mapping, argument
checks (fractions, targets, attribution maps), and figures written as PNG files.

A *path* here is either a :class:`nchains.critical_paths.CriticalPath` (its ``.mask``) or a
mapping site key -> BoolTensor[*neuron shape] (True = on the path), keyed like
:func:`nchains.instrument.taps.sites` (``layer1.0.relu@1``), so the metrics work on masks from
any selection method.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from nchains._util.io import PathLike, write_atomic

__all__ = ["check_fractions", "check_map", "check_targets", "fraction", "mask_of", "pixel_scores", "save_png"]


def mask_of(path, name: str = "path") -> Dict[str, torch.Tensor]:
    """The masks of ``path``: ``path.mask`` of a CriticalPath, or the mapping itself (checked).

    Returns:
        dict site key -> BoolTensor[*neuron shape], in the path's order.

    Raises:
        TypeError: neither a CriticalPath nor a mapping of str -> BoolTensor.
        ValueError: an empty mapping.
    """
    from nchains.critical_paths.path import CriticalPath

    mask = path.mask if isinstance(path, CriticalPath) else path
    if not isinstance(mask, Mapping):
        raise TypeError(f"{name} must be a CriticalPath or a mapping site key -> BoolTensor, got "
                        f"{type(path).__name__}")
    if not mask:
        raise ValueError(f"{name} has no sites; accepted: a mask for at least one site")
    out = {}
    for key, m in mask.items():
        if not isinstance(key, str):
            raise TypeError(f"{name}: site keys must be str, got {type(key).__name__}")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"{name}[{key!r}] must be a BoolTensor, got "
                            f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        out[key] = m.detach()
    return out


def check_fractions(fractions, name: str = "fractions") -> Tuple[float, ...]:
    """``fractions`` as a tuple of floats: at least one, each finite in [0, 1], strictly increasing.

    Raises:
        TypeError, ValueError: naming the first offending value.
    """
    if isinstance(fractions, torch.Tensor):
        fractions = fractions.tolist()
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence):
        raise TypeError(f"{name} must be a sequence of floats in [0, 1], got {type(fractions).__name__}")
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise TypeError(f"{name} must hold floats in [0, 1], got {f!r}")
        f = float(f)
        if not math.isfinite(f) or not 0.0 <= f <= 1.0:
            raise ValueError(f"{name} must hold floats in [0, 1], got {f!r}")
        if out and f <= out[-1]:
            raise ValueError(f"{name} must be strictly increasing, got {f!r} after {out[-1]!r}")
        out.append(f)
    if not out:
        raise ValueError(f"{name} must hold at least one fraction, got an empty sequence")
    return tuple(out)


def check_map(attributions, images: torch.Tensor, name: str = "attributions") -> torch.Tensor:
    """``attributions`` as finite floats Tensor[N, C', H, W] matching ``images`` Tensor[N, C, H, W]:
    C' = C or 1; a Tensor[N, H, W] gains the channel dimension. On the images' device."""
    if not isinstance(attributions, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor[N, C, H, W] like the images, got {type(attributions).__name__}")
    if attributions.dim() == 3:
        attributions = attributions.unsqueeze(1)
    n, c, h, w = images.shape
    if (attributions.dim() != 4 or attributions.shape[0] != n or tuple(attributions.shape[2:]) != (h, w)
            or attributions.shape[1] not in (1, c)):
        raise ValueError(f"{name} must have shape [{n}, {c} or 1, {h}, {w}] (one map per image), got "
                         f"{list(attributions.shape)}")
    if not attributions.is_floating_point():
        raise ValueError(f"{name} must be floating-point, got {attributions.dtype}")
    from nchains._util.tensors import check_finite

    return check_finite(attributions.detach(), name).to(images.device)


def pixel_scores(attributions: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """One relevance score per pixel: the attribution summed over channels (then ``|.|`` when
    ``absolute``). Tensor[N, C, H, W] -> Tensor[N, H*W], float64 (ties and sums stay exact)."""
    s = attributions.double().sum(1).flatten(1)
    return s.abs() if absolute else s


def check_targets(target, logits: torch.Tensor, name: str = "target") -> torch.Tensor:
    """The class of every image: ``"pred"`` (argmax of ``logits`` Tensor[N, K]), one int for all,
    or a LongTensor[N] / sequence of N ints, each in [0, K). Returns LongTensor[N] on logits' device."""
    n, k = logits.shape
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"{name} must be 'pred', an int or N ints in [0, {k}), got {target!r}")
        return logits.argmax(1)
    if isinstance(target, bool):
        raise TypeError(f"{name} must be 'pred', an int or N ints, got a bool")
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long)
    elif isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dim() <= 1:
        t = target.reshape(-1).long().cpu()
        t = t.expand(n).clone() if t.numel() == 1 else t
    elif isinstance(target, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in target):
        t = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TypeError(f"{name} must be 'pred', an int or N ints, got {type(target).__name__}")
    if t.numel() != n:
        raise ValueError(f"{name} must give one class per image ({n}), got {t.numel()}")
    if n and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(f"{name} must hold classes in [0, {k}), got {t.tolist()[:8]}")
    return t.to(logits.device)


def save_png(fig, path: Optional[PathLike]):
    """Writes ``fig`` (a matplotlib Figure) to ``path`` as PNG, atomically, when ``path`` is given.

    Returns:
        the figure.
    """
    if path is not None:
        from nchains.neurochains.analyses.plots import png_bytes

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        write_atomic(path, png_bytes(fig))
    return fig


def fraction(num: int, den: int) -> Optional[float]:
    """num / den, or None when den is 0 (JSON-able: never NaN)."""
    return None if den == 0 else num / den

