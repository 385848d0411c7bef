"""``nchains.contributions``: the contribution of every neuron or channel of every layer at once."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.tensors import check_images
from nchains.contrib.ablation import ablation
from nchains.contrib.intgrad import intgrad
from nchains.contrib.layers import resolve_sites
from nchains.contrib.result import Contributions
from nchains.contrib.targets import Target, check_target, output_width, resolve_targets
from nchains.contrib.taylor import check_logits, taylor
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.instrument.taps import tap

__all__ = ["METHODS", "UNITS", "contributions"]

METHODS = ("taylor", "intgrad", "ablation")
UNITS = ("channel", "neuron")
MAX_STEPS = 100_000


def _check_args(model, method, unit, absolute, steps, batch_size, progress) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if method == "ablation" and unit != "channel":
        raise ValueError(f"unit must be 'channel' with method='ablation' (a channel is zeroed at a time), got {unit!r}")
    if not isinstance(absolute, bool):
        raise TypeError(f"absolute must be a bool, got {type(absolute).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS}], got {steps!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1 (rows per suffix run), got {batch_size!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")


def _bar(total: int, method: str, progress: Optional[bool]):
    import sys

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=f"{method} contributions", unit="site", disable=not show, leave=False)


def contributions(model: nn.Module, images: torch.Tensor, *, target: Target = "pred", method: str = "taylor",
                  layers: Union[str, Sequence[str]] = "activations", unit: str = "channel", absolute: bool = False,
                  steps: int = 50, batch_size: Optional[int] = None, progress: Optional[bool] = False,
                  graph: Optional[ModelGraph] = None) -> Contributions:
    """Contributions of the neurons (or channels) of every requested site to the target logit Φ.

    Args:
        model (nn.Module): a traceable classifier returning logits Tensor[N, K] (eval mode is
            set; the model is not modified).
        images (Tensor[N, C, H, W]): finite floats; moved to the model's device and dtype.
        target: ``"pred"`` (the model's argmax per image), an int class, or LongTensor[N].
        method (str): ``"taylor"``: ``a · ∂Φ/∂a`` of all sites from one forward and one backward;
            ``"intgrad"``: integrated gradients of each site's neurons, zero baseline, ``steps``
            midpoint steps; ``"ablation"``: exact ``Φ(x) − Φ(x; channel c = 0)``.
        layers: ``"activations"`` (every activation call, execution order), ``"units"`` (every
            conv(+BN)(+act) unit output), or a list of module paths (each call its own site).
        unit (str): ``"channel"`` -> Tensor[N, C] (summed over space), ``"neuron"`` -> the
            activation's shape ``[N, C, H, W]`` / ``[N, F]``; ablation: ``"channel"`` only.
        absolute (bool): ``|·|`` per neuron (before the channel sum; ablation: per channel).
        steps (int): intgrad's Riemann steps, in [1, 100000] (the paper: 50).
        batch_size (int or None): intgrad/ablation rows (image × step or channel) per suffix
            run, to bound memory; None: as many as a 256 MB activation budget allows.
        progress (bool or None): a tqdm bar over the sites (None: when stderr is a terminal).
        graph (ModelGraph): ``nchains.analyze(model, images[:1])`` to reuse.

    Returns:
        Contributions: a Mapping site key -> Tensor in execution order, with ``.sites``,
        ``.target``, ``.logits`` and, for intgrad, ``.delta`` (key -> Tensor[N], the
        completeness error ``Σ C − (Φ(x) − Φ(x; a = 0))``).

    Raises:
        TypeError, ValueError: on a bad argument, checked before any work.

    Example:
        >>> c = nchains.contributions(model, images, method="taylor")
        >>> c["layer1.0.relu@1"].shape          # Tensor[N, 64]
        >>> c.top("layer4.1.relu@1", 3)         # [(channel, mean value), ...]
    """
    _check_args(model, method, unit, absolute, steps, batch_size, progress)
    images = check_images(images)
    check_target(target, len(images))
    device, dtype = model_device_dtype(model)
    images = images.detach().to(device=device, dtype=dtype)
    graph = graph_for(model, images.shape[1:], graph, example=images[:1])
    chosen = resolve_sites(graph, layers)
    k = output_width(graph)  # a target out of range is refused before any work
    resolve_targets(target, torch.zeros(len(images), k))
    reduction = "channel" if unit == "channel" else "none"
    with _bar(len(chosen), method, progress) as bar:
        if method == "taylor":
            values, logits, t = taylor(graph, chosen, images, lambda lg: resolve_targets(target, lg), reduction,
                                       absolute, bar)
            return Contributions(values, chosen, t, logits, method, unit, absolute)
        with torch.no_grad():
            logits = check_logits(tap(graph, [])(images)[0])
        t = resolve_targets(target, logits)
        if method == "ablation":
            values = ablation(graph, chosen, images, logits, t, absolute, batch_size, bar)
            return Contributions(values, chosen, t, logits, method, unit, absolute)
        values, delta = intgrad(graph, chosen, images, logits, t, reduction, absolute, steps, batch_size, bar)
        return Contributions(values, chosen, t, logits, method, unit, absolute, delta)
