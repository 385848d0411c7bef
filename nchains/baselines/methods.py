"""The path-selection and attribution methods the paper compares, under one name each.

Path methods (a CriticalPath per image and sparsity): ``intgrad`` (NeuronIntGrad) and ``mct``
(NeuronMCT) from :func:`nchains.critical_paths.critical_paths`; ``greedy`` (Algorithm 1),
``dgr1`` (DGR, gates initialised to 1) and ``dgr-random`` (DGR, U(0, 1) gates) from this
package. Input methods (an attribution map per image): ``input-intgrad`` (InputIntGrad) and
``input-mct`` (InputMCT, gradient × input). References for the attribution metrics:
``gradient`` (the input gradient) and ``random`` (a seeded U(0, 1) map).

A path method's attribution is its path gradient ``∂Φ(x; e)/∂x`` (:meth:`CriticalPath.attribution`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, List, Sequence

import torch
from torch import nn

__all__ = ["INPUT_METHODS", "METHODS", "PATH_METHODS", "REFERENCES", "Settings", "attribution_method",
           "display_name", "method_paths"]

#: Path-selection methods and the paper's names for them.
PATH_METHODS = {"intgrad": "NeuronIntGrad", "mct": "NeuronMCT", "greedy": "GreedyPruning", "dgr1": "DGR(init=1)",
                "dgr-random": "DGR(init=r)"}
#: Input-space attribution methods.
INPUT_METHODS = {"input-intgrad": "InputIntGrad", "input-mct": "InputMCT"}
#: Reference attributions of the attribution metrics (always cheap).
REFERENCES = {"gradient": "Gradient", "random": "Random"}
METHODS = {**PATH_METHODS, **INPUT_METHODS}


@dataclass(frozen=True)
class Settings:
    """How the methods run (defaults: the papers' where they give one; see the baselines).

    Attributes:
        steps (int): integrated-gradient steps of NeuronIntGrad and InputIntGrad (paper: 50).
        greedy_step (float): fraction of the kept neurons greedy pruning removes per step (0.01).
        greedy_continue (bool): greedy pruning goes on by original activation when the non-zero
            scores run out (default: it stops and reports the sparsity reached).
        dgr_steps (int), dgr_lam (float), dgr_lr (float), dgr_momentum (float), dgr_clamp (float):
            DGR's schedule (:mod:`nchains.baselines.dgr`: 1000, 0.01, 0.01, 0.9, 100).
        batch (int): images per greedy / DGR run (batched; memory grows with it).
        seed (int): DGR(init=r)'s draws, the random reference and the sanity check's re-initialisation.
    """

    steps: int = 50
    greedy_step: float = 0.01
    greedy_continue: bool = False
    dgr_steps: int = 1000
    dgr_lam: float = 0.01
    dgr_lr: float = 0.01
    dgr_momentum: float = 0.9
    dgr_clamp: float = 100.0
    batch: int = 25
    seed: int = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{f.name} must be an int >= 0, got {value!r}")
            if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                               or not math.isfinite(value) or value < 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise TypeError(f"{f.name} must be a bool, got {type(value).__name__}")
        for name in ("steps", "dgr_steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def display_name(method: str, sparsity=None) -> str:
    """The paper's name, with the sparsity for a path method: ``"NeuronIntGrad 90%"``."""
    name = {**METHODS, **REFERENCES}.get(method, method)
    return name if sparsity is None else f"{name} {100 * sparsity:g}%"


def _check_method(method: str, accepted) -> None:
    if method not in accepted:
        raise ValueError(f"method must be one of {', '.join(accepted)}, got {method!r}")


def method_paths(method: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 sparsities: Sequence[float], settings: Settings, graph=None) -> List[list]:
    """The paths of ``method`` for every image at every sparsity.

    Args:
        method (str): one of :data:`PATH_METHODS`.
        images (Tensor[B, C, H, W]); targets (LongTensor[B]): the class per image.
        sparsities (sequence of float); settings (Settings); graph (ModelGraph): to reuse.

    Returns:
        list per image of a list per sparsity of CriticalPath.
    """
    from nchains.baselines.dgr import dgr_paths
    from nchains.baselines.greedy import greedy_paths
    from nchains.critical_paths import critical_paths

    _check_method(method, PATH_METHODS)
    sparsities, t = list(sparsities), [int(v) for v in targets]
    if method in ("intgrad", "mct"):
        return [critical_paths(model, images[i:i + 1], sparsities, method=method, target=t[i], steps=settings.steps,
                               graph=graph) for i in range(len(images))]
    if method == "greedy":
        return greedy_paths(model, images, sparsities, target=t, step=settings.greedy_step,
                            continue_by_activation=settings.greedy_continue, graph=graph)
    return dgr_paths(model, images, sparsities, target=t, init=1.0 if method == "dgr1" else "random",
                     lam=settings.dgr_lam, steps=settings.dgr_steps, lr=settings.dgr_lr,
                     momentum=settings.dgr_momentum, clamp=settings.dgr_clamp, seed=settings.seed, graph=graph)


def attribution_method(method: str, settings: Settings, sparsity=None) -> Callable:
    """``f(model, images, targets) -> Tensor[B, C, H, W]`` of a method (a path method at ``sparsity``),
    the shape :func:`nchains.metrics.randomisation_sanity` calls (greedy/DGR run batched)."""
    from nchains.critical_paths import input_intgrad, input_mct
    from nchains.metrics import gradient, random_attribution

    _check_method(method, {**METHODS, **REFERENCES})
    if method == "gradient":
        return gradient
    if method == "random":
        return random_attribution(settings.seed)
    if method in INPUT_METHODS:
        def one(model, x, t):
            if method == "input-mct":
                return input_mct(model, x, target=t)
            return input_intgrad(model, x, target=t, steps=settings.steps)

        def inputs(model, images, targets):
            return torch.cat([one(model, images[i:i + 1], int(targets[i])).detach() for i in range(len(images))])
        return inputs
    if sparsity is None:
        raise ValueError(f"a path method ({method}) needs a sparsity for its attribution")

    def path(model, images, targets):
        maps = []
        for start in range(0, len(images), settings.batch):
            rows = method_paths(method, model, images[start:start + settings.batch],
                                targets[start:start + settings.batch], [sparsity], settings)
            maps += [row[0].attribution().detach() for row in rows]
        return torch.cat(maps)
    return path
