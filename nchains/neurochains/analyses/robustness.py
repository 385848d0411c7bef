"""Robustness (NeuroChains Fig. 5): the probability of the ground-truth class under the original
model and under the chain, on the chain's images and on adversarial examples of them.

Attacks (untargeted, on the cross-entropy of the ground-truth class, L-infinity ball of radius
``eps`` in the model's input units, i.e. after preprocessing; clipped to ``bounds`` when given):

- FGSM (Goodfellow et al.): one step ``x + eps * sign(grad)``.
- PGD (Madry et al.): random start uniform in the ball (seeded), ``steps`` steps of
  ``step_size * sign(grad)``, each projected back onto the ball (and ``bounds``).

Defaults: ``eps = 0.1`` input units (for the shipped model's Fashion-MNIST normalisation,
std 0.353: 0.035 in [0, 1] pixels, about 9/255), ``steps = 10``, ``step_size = eps / 4``.

The adversarial examples are crafted against the original model and both models are evaluated
on the same examples (the paper's setting: the chain's robustness to the original's attacks);
``white_box`` also attacks the chain itself.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nchains.neurochains.analyses._common import (DEFAULT_BATCH, build_context, check_int, check_real, json_float,
                                                  logits_of, progress_bar)

__all__ = ["DEFAULT_EPS", "DEFAULT_STEPS", "fgsm", "pgd", "plot_robustness", "robustness"]

DEFAULT_EPS = 0.1
DEFAULT_STEPS = 10
Bound = Union[float, torch.Tensor]


def _clip(x: torch.Tensor, bounds: Optional[Tuple[Bound, Bound]]) -> torch.Tensor:
    if bounds is None:
        return x
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in bounds)
    return torch.maximum(torch.minimum(x, hi), lo)


def _check_bounds(bounds) -> Optional[Tuple[Bound, Bound]]:
    if bounds is None:
        return None
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"bounds must be None or (low, high) of numbers or tensors, got {bounds!r}")
    lo, hi = (torch.as_tensor(b, dtype=torch.float64) for b in bounds)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or bool((lo >= hi).any()):
        raise ValueError(f"bounds must be finite with low < high, got {bounds!r}")
    return tuple(bounds)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), y) / dx, summed over the batch (each image's gradient is its own)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)  # only the input: the model's parameters get no .grad
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         bounds: Optional[Tuple[Bound, Bound]] = None) -> torch.Tensor:
    """FGSM: ``clip(x + eps * sign(d CE(model(x), y) / dx))``.

    Args:
        model (nn.Module): the attacked classifier.
        x (Tensor[N, C, H, W]): inputs, on the model's device and dtype.
        y (Tensor[N]): true classes.
        eps (float): L-infinity radius (input units), >= 0.
        bounds ((low, high)): valid input range (floats or tensors broadcastable to ``x``), or None.

    Returns:
        Tensor[N, C, H, W]: adversarial inputs.
    """
    eps = check_real("eps", eps)
    return _clip(x + eps * _input_grad(model, x, y).sign(), bounds).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = DEFAULT_STEPS,
        step_size: Optional[float] = None, bounds: Optional[Tuple[Bound, Bound]] = None, seed: int = 0
        ) -> torch.Tensor:
    """PGD in the L-infinity ball of radius ``eps`` around ``x``, from a random start.

    Args:
        model, x, y, eps, bounds: as for :func:`fgsm`.
        steps (int): gradient steps, in [1, 10**4].
        step_size (float): per-step change (default ``eps / 4``), > 0.
        seed (int): seed of the random start (a generator of its own; global RNG untouched).

    Returns:
        Tensor[N, C, H, W]: adversarial inputs, every value within ``eps`` of ``x``.
    """
    eps = check_real("eps", eps)
    steps = check_int("steps", steps, 1, 10**4)
    step_size = eps / 4 if step_size is None else check_real("step_size", step_size, "gt0")
    seed = check_int("seed", seed, 0, 2**63 - 1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * eps
    adv = _clip(x + start.to(device=x.device, dtype=x.dtype), bounds)
    for _ in range(steps):
        adv = adv + step_size * _input_grad(model, adv, y).sign()
        adv = _clip(torch.maximum(torch.minimum(adv, x + eps), x - eps), bounds).detach()
    return adv


def _true_prob(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.softmax(logits_of(model, x, batch_size).double(), 1).gather(1, y[:, None]).squeeze(1)


def _attack_batches(fn, model, x, y, batch_size: int, bar) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        out.append(fn(model, x[i:i + batch_size], y[i:i + batch_size]))
        if bar is not None:
            bar.update(1)
    return torch.cat(out)


def robustness(chain, model=None, images: Optional[torch.Tensor] = None, *, labels: Optional[torch.Tensor] = None,
               eps: float = DEFAULT_EPS, steps: int = DEFAULT_STEPS, step_size: Optional[float] = None,
               bounds: Optional[Tuple[Bound, Bound]] = None, white_box: bool = True, seed: int = 0,
               masked=None, graph=None, batch_size: int = DEFAULT_BATCH, progress: bool = False) -> Dict[str, Any]:
    """Ground-truth probabilities of the original model and the chain, clean and attacked.

    Args:
        chain (Chain): the chain (or a :class:`~._common.Context` of it).
        model (nn.Module): its original model.
        images (Tensor[N, *chain.input_shape]): the chain's images.
        labels (Tensor[N] of int): ground-truth classes (default: the original model's classes).
        eps, steps, step_size, bounds, seed: the attacks' parameters (see the module docstring).
        white_box (bool): also attack the chain itself (PGD and FGSM crafted on the chain).
        masked, graph, batch_size: as for :func:`~.faithfulness.faithfulness`.
        progress (bool): a progress bar over the attacked batches.

    Returns:
        dict: ``original`` and ``chain``: ``{clean, fgsm, pgd}`` -> the ground-truth probability
        per image, on the examples crafted against the original model; ``chain_white_box``
        (when asked): the same for attacks crafted on the chain; ``mean`` of each list under
        ``means``; the parameters (``eps``, ``steps``, ``step_size``, ``bounds``, ``labels``:
        "given" or "original model's classes").
    """
    eps = check_real("eps", eps)
    steps = check_int("steps", steps, 1, 10**4)
    step_size = eps / 4 if step_size is None else check_real("step_size", step_size, "gt0")
    bounds = _check_bounds(bounds)
    ctx = build_context(chain, model, images, masked=masked, graph=graph, batch_size=batch_size)
    y = ctx.predicted if labels is None else _check_labels(labels, len(ctx.images), ctx.p_logits.shape[1])
    y = y.to(ctx.device)
    attacks = {"fgsm": lambda m, x, t: fgsm(m, x, t, eps, bounds),
               "pgd": lambda m, x, t: pgd(m, x, t, eps, steps, step_size, bounds, seed)}
    batches = -(-len(ctx.images) // ctx.batch_size)
    bar = progress_bar(batches * (4 if white_box else 2), "robustness", progress)
    result: Dict[str, Any] = {"original": {"clean": _true_prob(ctx.model, ctx.images, y, ctx.batch_size)},
                              "chain": {"clean": _true_prob(ctx.masked, ctx.images, y, ctx.batch_size)}}
    try:
        for name, fn in attacks.items():
            adv = _attack_batches(fn, ctx.model, ctx.images, y, ctx.batch_size, bar)
            result["original"][name] = _true_prob(ctx.model, adv, y, ctx.batch_size)
            result["chain"][name] = _true_prob(ctx.masked, adv, y, ctx.batch_size)
            if white_box:
                adv = _attack_batches(fn, ctx.masked, ctx.images, y, ctx.batch_size, bar)
                result.setdefault("chain_white_box", {"clean": result["chain"]["clean"]})
                result["chain_white_box"][name] = _true_prob(ctx.masked, adv, y, ctx.batch_size)
    finally:
        if bar is not None:
            bar.close()
    means = {who: {k: json_float(v.mean()) for k, v in d.items()} for who, d in result.items()}
    out = {who: {k: [json_float(p) for p in v.tolist()] for k, v in d.items()} for who, d in result.items()}
    out.update({"means": means, "eps": eps, "steps": steps, "step_size": step_size,
                "bounds": None if bounds is None else [torch.as_tensor(b).tolist() for b in bounds],
                "labels": "given" if labels is not None else "original model's classes", "seed": seed})
    return out


def _check_labels(labels, n: int, classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                      torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer Tensor[{n}], got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per image), got {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must be classes in [0, {classes - 1}], got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def plot_robustness(result: Dict[str, Any]):
    """Histograms of the ground-truth probability, original (left) vs chain (right), clean and
    under FGSM and PGD crafted on the original (Fig. 5).

    Returns:
        matplotlib.figure.Figure.
    """
    from nchains.neurochains.analyses.plots import new_figure

    fig, axes = new_figure(2)
    colours = {"clean": "tab:green", "fgsm": "tab:orange", "pgd": "tab:red"}
    names = {"clean": "original samples", "fgsm": "FGSM", "pgd": "PGD"}
    bins = [i / 20 for i in range(21)]
    for ax, who, title in ((axes[0], "original", "original model"), (axes[1], "chain", "chain")):
        for k in ("clean", "fgsm", "pgd"):
            vals = [v for v in result[who][k] if v is not None]
            ax.hist(vals, bins=bins, alpha=0.55, color=colours[k],
                    label=f"{names[k]} (mean {result['means'][who][k]:.2f})")
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability of the ground-truth class")
        ax.set_ylabel("images")
        ax.legend(fontsize=8, loc="upper center")
        ax.set_title(f"Robustness of the {title} (eps = {result['eps']:g})", fontsize=10)
    return fig
