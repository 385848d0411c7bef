"""SMOE scale saliency maps (Mundhenk et al. 2019, "Efficient saliency maps for explainable AI")
of a chain's layers, as NeuroChains' case studies show them (one map per kept layer of the
sub-network, plus "Combine All").

The SMOE (Saliency Map Order Equivalence) scale of an activation ``x`` (``Tensor[N, C, H, W]``,
after the ReLU) is, at every pixel, over its ``C`` channels (``x' = x + eps``, ``eps = 1e-7``
avoids ``log 0``)::

    m = mean_c(x'_c)
    S = m * (log2(m) - mean_c(log2(x'_c)))  = m * log2(m / geometric_mean_c(x'_c))

the mean times the log ratio of the arithmetic to the geometric mean: large where the channels
respond strongly *and* unevenly (information is concentrated in a few filters). This is the
statistic of the authors' FastCAM code (``SMOEScaleMap``). Each map is then normalised, as in
FastCAM, by the CDF of a gamma distribution fitted to it by moments (``k = mean^2 / var``,
``theta = var / mean``: :func:`gamma_norm`), upsampled bilinearly to the image size, and the
"Combine All" map is the mean of the normalised layer maps.

In the chain only the kept filters of a layer exist (removed ones are structurally zero, not a
measured response), so a layer's SMOE scale is taken over its kept filters only.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from nchains.report.unit_outputs import unit_outputs

__all__ = ["EPS", "gamma_norm", "smoe_maps", "smoe_scale"]

#: Added to every activation before the logs (FastCAM's value).
EPS = 1e-7


def smoe_scale(activation: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The SMOE scale per pixel over channels.

    Args:
        activation (Tensor[N, C, H, W]): non-negative activations (after a ReLU; negative
            values are clamped to 0 as a ReLU would).
        eps (float): added before the logs, > 0.

    Returns:
        Tensor[N, H, W], >= 0 up to rounding (arithmetic mean >= geometric mean), same dtype.
    """
    if not isinstance(activation, torch.Tensor) or activation.dim() != 4 or not activation.is_floating_point():
        raise ValueError(f"activation must be a floating-point Tensor[N, C, H, W], got "
                         f"{getattr(activation, 'shape', type(activation).__name__)}")
    if not (isinstance(eps, (int, float)) and eps > 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    x = activation.clamp_min(0) + eps
    m = x.mean(dim=1)
    return m * (torch.log2(m) - torch.log2(x).mean(dim=1))


def gamma_norm(maps: torch.Tensor) -> torch.Tensor:
    """Each map through the CDF of a gamma distribution fitted to its values by moments.

    Args:
        maps (Tensor[N, H, W]): non-negative maps.

    Returns:
        Tensor[N, H, W] in [0, 1]; a map of constant value gives zeros.
    """
    flat = maps.flatten(1).double().clamp_min(0)
    mean = flat.mean(1, keepdim=True)
    var = flat.var(1, unbiased=False, keepdim=True)
    ok = (var > 0) & (mean > 0)
    k = torch.where(ok, mean ** 2 / var.clamp_min(1e-300), torch.ones_like(mean))
    theta = torch.where(ok, var / mean.clamp_min(1e-300), torch.ones_like(mean))
    out = torch.special.gammainc(k, flat / theta)
    out = torch.where(ok, out, torch.zeros_like(out))
    return out.reshape(maps.shape).to(maps.dtype)


def smoe_maps(chain, masked, images: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Normalised SMOE maps of ``images`` in the chain, at the images' size.

    Args:
        chain (Chain): the chain (its kept filters choose the channels).
        masked (ScoredModel): ``chain.apply(model)``.
        images (Tensor[N, C, H, W]): on the model's device, in its dtype.
        layers (sequence of str): layers the chain computes
            (:func:`~nchains.report.unit_outputs.computed_layers`), in graph order.

    Returns:
        dict: layer -> Tensor[N, H, W] in [0, 1] (:func:`gamma_norm`, bilinear upsampling), and
        ``"combined"`` -> their mean (Tensor[N, H, W]); all on the CPU in float32.
    """
    with torch.no_grad():
        outs = unit_outputs(masked, layers, images)
    size = tuple(images.shape[2:])
    maps: Dict[str, torch.Tensor] = {}
    for layer in layers:
        act = outs[layer][:, chain.kept[layer]]
        s = gamma_norm(smoe_scale(act))
        up = F.interpolate(s[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        maps[layer] = up.clamp(0, 1).cpu()
    if maps:
        maps["combined"] = torch.stack(list(maps.values())).mean(0)
    return maps
