"""The input-space attributions the paper compares path gradients with (Sec. 3.2, Fig. 5).

- :func:`input_intgrad` (InputIntGrad): integrated gradients on the pixels with the zero
  (black) baseline, ``x ⊙ mean_k ∂Φ(α_k x)/∂x`` at the midpoints ``α_k = (k + ½) / steps``;
  completeness ``Σ ≈ Φ(x) − Φ(0)`` holds up to the Riemann error.
- :func:`input_mct` (InputMCT): gradient × input, ``x ⊙ ∂Φ(x)/∂x``.

Both take one image, Tensor[1, C, H, W] (or [C, H, W]), and return Tensor[1, C, H, W] on the
model's device and dtype; the scaled inputs of IG are batched (``batch_size`` per forward).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from nchains.critical_paths.path import check_image, resolve_target

__all__ = ["input_intgrad", "input_mct"]

MAX_STEPS = 100_000


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [{low}, {high}], got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value}")
    return value


def _target(model: nn.Module, x: torch.Tensor, target) -> int:
    with torch.no_grad():
        return resolve_target(target, model(x))


def input_mct(model: nn.Module, image: torch.Tensor, target: Union[int, str] = "pred") -> torch.Tensor:
    """Gradient × input of the target logit (InputMCT).

    Args:
        model (nn.Module): the network (eval mode is set).
        image (Tensor[1, C, H, W] or [C, H, W]): finite floats.
        target (int or "pred"): the class of the logit Φ.

    Returns:
        Tensor[1, C, H, W]: ``x ⊙ ∂Φ(x)/∂x``.
    """
    model.eval()
    x = check_image(image, model)
    t = _target(model, x, target)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[0, t], xg)
    return grad * x


def input_intgrad(model: nn.Module, image: torch.Tensor, target: Union[int, str] = "pred", steps: int = 50,
                  batch_size: Optional[int] = None) -> torch.Tensor:
    """Integrated gradients on the pixels, zero baseline (InputIntGrad).

    Args:
        model (nn.Module): the network (eval mode is set).
        image (Tensor[1, C, H, W] or [C, H, W]): finite floats.
        target (int or "pred"): the class of the logit Φ.
        steps (int): midpoint Riemann steps, in [1, 100000] (the paper: 50).
        batch_size (int): scaled images per forward (default: all ``steps`` at once).

    Returns:
        Tensor[1, C, H, W]: ``x ⊙ (1/steps) Σ_k ∂Φ(α_k x)/∂x``, ``α_k = (k + ½) / steps``.
    """
    steps = _check_int(steps, "steps", 1, MAX_STEPS)
    batch_size = steps if batch_size is None else _check_int(batch_size, "batch_size", 1, MAX_STEPS)
    model.eval()
    x = check_image(image, model)
    t = _target(model, x, target)
    alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps
    total = torch.zeros_like(x)
    for start in range(0, steps, batch_size):
        a = alphas[start:start + batch_size].view(-1, *([1] * (x.dim() - 1)))
        scaled = (a * x).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(scaled)[:, t].sum(), scaled)
        total += grad.sum(0, keepdim=True)
    return x * total / steps
