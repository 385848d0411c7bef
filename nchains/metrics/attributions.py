"""Attribution methods in the one shape the metrics call: ``method(model, images, targets) ->
Tensor[N, C, H, W]`` (``targets`` LongTensor[N]). Plain baselines (input gradient, a seeded
random map) and adapters of nchains' per-image methods (critical-path gradient, InputIntGrad).

Example:
    >>> methods = {"gradient": gradient, "random": random_attribution(0),
    ...            "path-intgrad": path_attribution("intgrad", sparsity=0.9)}
    >>> roar(methods, train_size=2000, test_size=500)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["gradient", "gradient_x_input", "input_intgrad_attribution", "path_attribution", "random_attribution"]


def gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂Φ_t/∂x, the input gradient of each image's target logit. Tensor[N, C, H, W]."""
    x = images.detach().clone().requires_grad_(True)
    logits = model(x)
    (g,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1).to(logits.device)).sum(), x)
    return g.detach()


def gradient_x_input(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """x ⊙ ∂Φ_t/∂x (InputMCT of paper 2, batched). Tensor[N, C, H, W]."""
    return gradient(model, images, targets) * images.detach()


def random_attribution(seed: int = 0) -> Callable:
    """A method returning U(0, 1) maps drawn from a generator seeded with ``seed`` at each call
    (the same images get the same map; the ROAR and sanity baseline that explains nothing)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    def random(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(images.shape, generator=gen, dtype=torch.float64).to(images)

    return random


def _per_image(fn: Callable, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(model, images[i:i + 1], int(targets[i])).detach() for i in range(len(images))])


def path_attribution(method: str = "intgrad", sparsity: float = 0.9, steps: int = 50) -> Callable:
    """The critical-path gradient of :func:`nchains.critical_path` (paper 2, Sec. 3.2), one path per
    image: ``method`` ``"intgrad"`` (NeuronIntGrad) or ``"mct"`` (NeuronMCT)."""
    from nchains.critical_paths import METHODS, kept_count

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    kept_count(sparsity, 0)

    cache = {}  # the analysis of the last model seen: one trace for all images of one model

    def one(model, image, target):
        from nchains.critical_paths import critical_path
        from nchains.graph.analysis import analyze

        if cache.get("model") is not model or cache.get("shape") != tuple(image.shape[1:]):
            cache.update(model=model, shape=tuple(image.shape[1:]), graph=analyze(model.eval(), image))
        return critical_path(model, image, sparsity=sparsity, method=method, target=target, steps=steps,
                             graph=cache["graph"]).attribution()

    def path(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _per_image(one, model, images, targets)

    path.__name__ = f"path_{method}"
    return path


def input_intgrad_attribution(steps: int = 50) -> Callable:
    """InputIntGrad of :func:`nchains.critical_paths.input_intgrad` (zero baseline), per image."""
    from nchains.critical_paths import input_intgrad

    def intgrad(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _per_image(lambda m, x, t: input_intgrad(m, x, target=t, steps=steps), model, images, targets)

    return intgrad
