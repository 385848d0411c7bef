"""Structural similarity (SSIM, Wang et al. 2004) of 2-D maps, batched in torch.

Matches ``skimage.metrics.structural_similarity`` with its defaults for 2-D float images
(``win_size=7``, a **uniform 7×7 window**, ``K1=0.01``, ``K2=0.03``, sample covariances
``N/(N−1)``, the mean SSIM over the positions where the window fits entirely inside the image):
skimage filters with reflected borders and then crops ``(win_size − 1) / 2`` pixels per side, so
only windows inside the image count, which a stride-1 average pool without padding gives
directly. ``data_range`` must be given (skimage requires it for floats too).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ssim"]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, win_size: int = 7) -> torch.Tensor:
    """Mean structural similarity of each pair of maps.

    Args:
        a, b (Tensor[N, H, W] or [H, W]): finite floats of one shape, H and W >= ``win_size``.
        data_range (float): max − min of the value range (2 for maps in [−1, 1]), > 0.
        win_size (int): odd window side, >= 3.

    Returns:
        Tensor[N] (a 0-dim tensor for [H, W] inputs), float64, in [−1, 1].

    Raises:
        TypeError, ValueError: bad shapes, values or parameters.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"a and b must be Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.dim() not in (2, 3):
        raise ValueError(f"a and b must have one shape [N, H, W] or [H, W], got {list(a.shape)} and {list(b.shape)}")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd int >= 3, got {win_size!r}")
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"a and b must be at least {win_size}x{win_size} (win_size), got {list(a.shape[-2:])}")
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not (
            math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise ValueError("a and b must hold finite values only (NaN/Inf found)")
    single = a.dim() == 2
    x = a.detach().double().reshape(-1, 1, *a.shape[-2:])
    y = b.detach().double().reshape(-1, 1, *b.shape[-2:]).to(x.device)

    def mean(t):
        return torch.nn.functional.avg_pool2d(t, win_size, stride=1)

    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    out = s.flatten(1).mean(1)
    return out[0] if single else out
