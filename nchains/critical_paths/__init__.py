"""Sparse critical paths of one image's response (paper 2: sparse_critical_paths, Sec. 2.3, 3.1, 3.2).

:func:`critical_path` scores every neuron of every activation site (NeuronMCT or NeuronIntGrad,
from :func:`nchains.contrib.contributions`), keeps the most critical ones network-wise
(:mod:`.selection`) and returns a :class:`CriticalPath`: its locally linear path model
(:mod:`.path_model`) and path-gradient attribution. :mod:`.input_attr` has the input-space
methods the paper compares with (InputIntGrad, InputMCT).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from nchains.critical_paths.input_attr import input_intgrad, input_mct
from nchains.critical_paths.path import CriticalPath, check_image, resolve_target
from nchains.critical_paths.path_model import PathModel, SiteGate, build_path_model
from nchains.critical_paths.selection import kept_count, select, threshold
from nchains.graph.analysis import ModelGraph, graph_for

__all__ = ["CriticalPath", "METHODS", "PathModel", "SiteGate", "build_path_model", "critical_path", "critical_paths",
           "input_intgrad", "input_mct", "kept_count", "neuron_contributions", "select", "threshold"]

#: Contribution methods: NeuronIntGrad (signed neuron IG, zero baseline) and NeuronMCT (|a·∂Φ/∂a|).
METHODS = ("intgrad", "mct")


def neuron_contributions(model: nn.Module, image: torch.Tensor, method: str = "intgrad", target: int = 0,
                         steps: int = 50, graph: Optional[ModelGraph] = None, progress: bool = False):
    """The contribution of every neuron of every activation site at one image.

    ``"mct"``: NeuronMCT ``|a·∂Φ/∂a|`` (the paper's Taylor estimate of the marginal
    contribution ``|Φ(x) − Φ(x; a = 0)|``). ``"intgrad"``: NeuronIntGrad, integrated gradients
    on the site's neurons with zero baseline (Eq. 4), **signed**: the paper keeps ``c ≥ c_κ``
    with ``c`` as Eq. 4 gives it, and Prop. 5 (``c_κ > 0`` ⇒ every path neuron is active ⇒ the
    path model is locally linear) rests on the sign. Neurons that lower Φ rank last.

    Returns:
        dict site key -> Tensor[*site shape] (no batch), in execution order.
    """
    from nchains.contrib import contributions

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    c = contributions(model, image, target=target, method="taylor" if method == "mct" else "intgrad",
                      layers="activations", unit="neuron", absolute=method == "mct", steps=steps, graph=graph,
                      progress=progress)
    return {key: value[0].detach() for key, value in c.items()}


def _check_args(model, sparsities, method, steps, constants) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for s in sparsities:
        kept_count(s, 0)  # range checks before any work
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 100_000:
        raise ValueError(f"steps must be an int in [1, 100000], got {steps!r}")
    if constants not in ("original", "zero"):
        raise ValueError(f"constants must be 'original' or 'zero', got {constants!r}")


def critical_paths(model: nn.Module, image: torch.Tensor, sparsities: Sequence[float], method: str = "intgrad",
                   target: Union[int, str] = "pred", steps: int = 50, constants: str = "original",
                   graph: Optional[ModelGraph] = None, per_layer: bool = False, progress: bool = False
                   ) -> List[CriticalPath]:
    """:func:`critical_path` at several sparsities, from one computation of the contributions.

    Returns:
        list[CriticalPath], one per entry of ``sparsities``, in that order.
    """
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
        raise TypeError(f"sparsities must be a non-empty sequence of numbers in [0, 1], got {sparsities!r}")
    _check_args(model, sparsities, method, steps, constants)
    model.eval()
    x = check_image(image, model)
    graph = graph_for(model, x.shape[1:], graph, example=x)
    with torch.no_grad():
        t = resolve_target(target, model(x))
    scores = neuron_contributions(model, x, method, t, steps, graph, progress)
    out = []
    for sparsity in sparsities:
        path = CriticalPath(model, x, select(scores, sparsity, per_layer=per_layer), target=t, method=method,
                            contributions=scores, graph=graph, requested_sparsity=sparsity)
        path.linear_model(constants)
        out.append(path)
    return out


def critical_path(model: nn.Module, image: torch.Tensor, sparsity: float = 0.9, method: str = "intgrad",
                  target: Union[int, str] = "pred", steps: int = 50, constants: str = "original",
                  graph: Optional[ModelGraph] = None, per_layer: bool = False, progress: bool = False
                  ) -> CriticalPath:
    """The sparse critical path of ``model``'s response to ``image``.

    Args:
        model (nn.Module): a traceable network (eval mode is set; not modified).
        image (Tensor[1, C, H, W] or [C, H, W]): the input, finite floats.
        sparsity (float): in [0, 1]; ``round((1 − sparsity)·N)`` of the N neurons are kept.
        method (str): ``"intgrad"`` (NeuronIntGrad, signed) or ``"mct"`` (NeuronMCT, absolute);
            see :func:`neuron_contributions`.
        target (int or "pred"): the class of the pre-softmax logit Φ (``"pred"``: the argmax).
        steps (int): integrated-gradient steps (``"intgrad"`` only; the paper: 50).
        constants (str): ``"original"`` or ``"zero"``: which path model is built first (both stay
            available through :meth:`CriticalPath.linear_model`).
        graph (ModelGraph): ``nchains.analyze(model, image)`` to reuse.
        per_layer (bool): rank each site on its own instead (for comparison; not the paper's).
        progress (bool): a progress bar over the contribution computation.

    Returns:
        CriticalPath (``.mask``, ``.sparsity``, ``.contributions``, ``.attribution()``...).

    Raises:
        TypeError, ValueError: on a bad argument (checked before any work).
    """
    _check_args(model, [sparsity], method, steps, constants)
    return critical_paths(model, image, [sparsity], method, target, steps, constants, graph, per_layer, progress)[0]
