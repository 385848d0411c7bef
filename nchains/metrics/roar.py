"""ROAR-lite on Fashion-MNIST (Hooker et al. 2019; paper 2, Sec. 3.3, App. C.3, Fig. 6d):
RemOve And Retrain.

For each attribution method and each fraction k: the top-k pixels of every training and test
image (by the method's map on a fixed *explainer* model, the shipped Fashion-MNIST ResNet by
default, explaining each image's true label) are replaced by the fill value; a small CNN
(:func:`roar_cnn`) is trained from scratch on the degraded training set (seeded initialisation
and data order; Adam lr 3e-3, batch 64, a few epochs: 84% test accuracy from 2000 clean images
in 3 epochs, ~10 s on one core) and its test accuracy on the degraded test set is recorded.
The more accuracy drops as k grows, the better the method found the informative pixels: lower
AUCs are better. Retraining removes the distribution-shift confound of plain input degradation.

Pixels are ranked as in :mod:`nchains.metrics.degradation` (sum over channels, highest first,
ties by index), and removed pixels take the fill of :func:`~nchains.metrics.degradation.fill_values`
(default ``"zero"``: on the normalised scale this is the training set's mean pixel, Hooker's
choice). The k = 0 run is the same for every method: it is trained once per repeat and shared.

Leakage control (``mask_control=True``): ROAR's premise is that a degraded image tells the
retrained network only what the kept pixels show. The *shape* of the removed region can itself
carry the class (the top pixels of a class-conditioned map trace the object's outline), and then
accuracy rises as pixels go. The control trains the same CNN on the removal masks alone (1 where a
pixel was removed, 0 elsewhere; no pixel values) and reports their test accuracy per method and
k (``mask_accuracy``). Chance is about 0.1 on Fashion-MNIST; a mask accuracy far above it means
the masks leak the label, and ROAR's accuracies for that method cannot be read as the
information left in the kept pixels.

Example:
    >>> from nchains.metrics.attributions import gradient, random_attribution
    >>> r = roar({"gradient": gradient, "random": random_attribution(0)}, train_size=5000,
    ...          test_size=1000, epochs=3, progress=True)
    >>> r["methods"]["gradient"]["accuracy"], r["methods"]["gradient"]["auc"]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.io import PathLike
from nchains.metrics._common import check_fractions, check_map, save_png
from nchains.metrics.degradation import fill_values, removal_ranks

__all__ = ["DEFAULT_ROAR_FRACTIONS", "accuracy", "fashion_subsets", "plot_roar", "removal_masks", "roar", "roar_cnn",
           "train_classifier"]

#: The paper's fractions (App. C.3: top 30, 50, 70, 90 %), with the unmodified k = 0.
DEFAULT_ROAR_FRACTIONS = (0.0, 0.3, 0.5, 0.7, 0.9)


def roar_cnn(num_classes: int = 10, in_channels: int = 1, size: Sequence[int] = (28, 28)) -> nn.Module:
    """The small CNN ROAR retrains: conv3x3(16)-ReLU-maxpool-conv3x3(32)-ReLU-maxpool-linear
    (~20k parameters at 28x28), for inputs of ``size`` (H, W), each >= 4."""
    h, w = (int(v) // 4 for v in size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * h * w, num_classes))


def _check_int(value, name: str, low: int, high: int = 10 ** 9) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, epochs: int = 3, seed: int = 0, batch_size: int = 64,
                     lr: float = 3e-3, num_classes: int = 10, progress: bool = False, desc: str = "train") -> nn.Module:
    """A :func:`roar_cnn` trained on ``x`` Tensor[N, C, H, W] / ``y`` LongTensor[N] with Adam.

    Deterministic for a given ``seed`` on one device and thread count: the initialisation is
    drawn under ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global RNG state
    is restored), the data order from a generator of its own.

    Returns:
        nn.Module in eval mode, on ``x``'s device.
    """
    _check_int(epochs, "epochs", 1, 1000)
    _check_int(batch_size, "batch_size", 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = roar_cnn(num_classes, x.shape[1], x.shape[2:]).to(x.device, x.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    steps = epochs * math.ceil(len(x) / batch_size)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    return net.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Share of ``x`` Tensor[N, C, H, W] whose argmax is ``y`` LongTensor[N]."""
    correct = sum(int((model(x[s:s + batch_size]).argmax(1) == y[s:s + batch_size]).sum())
                  for s in range(0, len(x), batch_size))
    return correct / len(x)


def fashion_subsets(train_size: int, test_size: int, seed: int = 0, root: Optional[PathLike] = None):
    """Seeded random subsets of the Fashion-MNIST train and test splits, normalised like the
    shipped model's inputs: ``(train_x [n, 1, 28, 28] float32, train_y, test_x, test_y)``."""
    from nchains.models.fashion_mnist import load_fashion_mnist, normalize_fashion

    _check_int(train_size, "train_size", 10, 60000)
    _check_int(test_size, "test_size", 10, 10000)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for split, n in (("train", train_size), ("test", test_size)):
        images, labels = load_fashion_mnist(split, root=root)
        idx = torch.randperm(len(images), generator=gen)[:n]
        out += [normalize_fashion(images[idx]).unsqueeze(1), labels[idx]]
    return tuple(out)


def _maps(method: Callable, explainer: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
          progress: bool = False, desc: str = "attributions") -> torch.Tensor:
    """The method's maps of ``x`` on the explainer, in batches, on the CPU."""
    from tqdm.auto import tqdm

    device, dtype = model_device_dtype(explainer)
    maps = []
    for s in tqdm(range(0, len(x), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        xb = x[s:s + batch].to(device, dtype)
        maps.append(check_map(method(explainer, xb, y[s:s + batch].to(device)), xb,
                              name="method's attributions").to("cpu", torch.float64))
    return torch.cat(maps)


def _top_pixels(maps: torch.Tensor, k: float) -> torch.Tensor:
    """BoolTensor[N, 1, H, W]: the ``round(k * H * W)`` highest pixels of each map (ties by index)."""
    n, _, h, w = maps.shape
    return (removal_ranks(maps, "morf") < int(round(k * h * w))).view(n, 1, h, w)


def _removed(x: torch.Tensor, maps: torch.Tensor, k: float, fill: torch.Tensor) -> torch.Tensor:
    return torch.where(_top_pixels(maps, k), fill, x)


def removal_masks(maps: torch.Tensor, k: float) -> torch.Tensor:
    """Tensor[N, 1, H, W] float: 1 at the top-``k`` pixels of each map (the ones ROAR removes), else 0."""
    return _top_pixels(maps, k).to(torch.float32)


def _check_methods(methods) -> Dict[str, Callable]:
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("methods must be a non-empty mapping name -> callable(model, images, targets)")
    for name, m in methods.items():
        if not isinstance(name, str) or not callable(m):
            raise TypeError(f"methods must map str names to callables, got {name!r}: {type(m).__name__}")
    return dict(methods)


def roar(methods: Mapping[str, Callable], model: Optional[nn.Module] = None, *,
         fractions: Sequence[float] = DEFAULT_ROAR_FRACTIONS, train_size: int = 5000, test_size: int = 1000,
         epochs: int = 3, seed: int = 0, repeats: int = 1, fill: str = "zero", batch_size: int = 64,
         lr: float = 3e-3, attribution_batch: int = 100, root: Optional[PathLike] = None,
         mask_control: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Remove-and-retrain accuracy vs fraction of top pixels removed, per attribution method.

    Args:
        methods (mapping name -> callable): ``method(model, images, targets) -> Tensor[N, C or 1,
            H, W]``, called on the explainer with the images' true labels.
        model (nn.Module): the explainer; default the shipped model (``zoo.default_model()``).
        fractions (sequence of float): strictly increasing in [0, 1].
        train_size, test_size (int): images drawn (seeded) from the train and test splits.
        epochs (int): training epochs per retraining. seed (int): data subsets, initialisation,
            data order (repeat r uses ``seed + r``). repeats (int): retrainings per point.
        fill (str): ``"zero"``, ``"mean"`` or ``"blur"``. batch_size, lr: training.
        attribution_batch (int): images per method call. root: Fashion-MNIST idx directory.
        mask_control (bool): also train on the removal masks alone (the leakage control of the
            module docstring): one more retraining per method, fraction k > 0 and repeat.
        progress (bool): tqdm bars (overall and per training).

    Returns:
        dict: ``fractions``; ``methods``: name -> ``{"accuracy": [F] (mean over repeats),
        "per_repeat": [R][F], "auc"}`` (trapezoid over the fractions), plus with
        ``mask_control`` ``"mask_accuracy": [F]`` (None at k = 0, where no pixel is removed)
        and ``"mask_per_repeat"``; ``train_size``, ``test_size``, ``epochs``, ``seed``,
        ``repeats``, ``fill``, ``mask_control``.

    Raises:
        TypeError, ValueError: on a bad argument (before any training).
    """
    methods = _check_methods(methods)
    fractions = check_fractions(fractions)
    for name, value, low in (("epochs", epochs, 1), ("repeats", repeats, 1), ("seed", seed, 0),
                             ("batch_size", batch_size, 1), ("attribution_batch", attribution_batch, 1)):
        _check_int(value, name, low)
    if not isinstance(mask_control, bool):
        raise TypeError(f"mask_control must be a bool, got {type(mask_control).__name__}")
    fill_values(torch.zeros(1, 1, 1, 1), fill)  # the fill name's check
    if model is None:
        from nchains.models.zoo import default_model

        model = default_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    model.eval()
    train_x, train_y, test_x, test_y = fashion_subsets(train_size, test_size, seed, root)
    fills = (fill_values(train_x, fill), fill_values(test_x, fill))
    from tqdm.auto import tqdm

    positive = sum(1 for k in fractions if k > 0)
    runs = repeats * ((0.0 in fractions) + len(methods) * positive * (2 if mask_control else 1))
    bar = tqdm(total=runs, desc="ROAR retrainings", unit="run", disable=not progress)

    def run(tx, vx, r, desc):
        net = train_classifier(tx, train_y, epochs=epochs, seed=seed + r, batch_size=batch_size, lr=lr,
                               progress=progress, desc=desc)
        bar.update(1)
        return accuracy(net, vx, test_y)

    base = [run(train_x, test_x, r, "k=0") for r in range(repeats)] if 0.0 in fractions else None
    out: Dict[str, Any] = {}
    for name, method in methods.items():
        maps = (_maps(method, model, train_x, train_y, attribution_batch, progress, f"{name} maps (train)"),
                _maps(method, model, test_x, test_y, attribution_batch, progress, f"{name} maps (test)"))
        per = [[base[r] if k == 0.0 else run(_removed(train_x, maps[0], k, fills[0]),
                                             _removed(test_x, maps[1], k, fills[1]), r, f"{name} k={k:g}")
                for k in fractions] for r in range(repeats)]
        acc = np.asarray(per).mean(0)
        out[name] = {"accuracy": acc.tolist(), "per_repeat": per,
                     "auc": float(np.trapezoid(acc, fractions)) if len(fractions) > 1 else 0.0}
        if mask_control:
            masks = [[None if k == 0.0 else run(removal_masks(maps[0], k).to(train_x),
                                                removal_masks(maps[1], k).to(test_x), r, f"{name} masks k={k:g}")
                      for k in fractions] for r in range(repeats)]
            out[name]["mask_per_repeat"] = masks
            out[name]["mask_accuracy"] = [None if k == 0.0 else float(np.mean([m[j] for m in masks]))
                                          for j, k in enumerate(fractions)]
    bar.close()
    return {"fractions": list(fractions), "methods": out, "train_size": train_size, "test_size": test_size,
            "epochs": epochs, "seed": seed, "repeats": repeats, "fill": fill, "mask_control": mask_control}


def plot_roar(result: Mapping[str, Any], path: Optional[PathLike] = None):
    """Test accuracy after retraining vs fraction of top pixels removed (Fig. 6d), AUC in the legend;
    with a ``mask_control`` result also the accuracy on the removal masks alone (dashed).

    Returns:
        matplotlib.figure.Figure (written as PNG to ``path`` when given).
    """
    from nchains.neurochains.analyses.plots import new_figure

    if not isinstance(result, Mapping) or "methods" not in result or "fractions" not in result:
        raise ValueError("result must be a roar result (with 'fractions' and 'methods')")
    fig, ax = new_figure(1)
    for name, r in result["methods"].items():
        line, = ax.plot(result["fractions"], r["accuracy"], "o-", ms=3, label=f"{name} (AUC {r['auc']:.3g})")
        if r.get("mask_accuracy"):
            pts = [(k, a) for k, a in zip(result["fractions"], r["mask_accuracy"]) if a is not None]
            ax.plot(*zip(*pts), "x--", ms=4, color=line.get_color(), label=f"{name}: masks alone")
    ax.set_xlabel("fraction of top pixels removed")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(f"ROAR ({result.get('train_size')} train images, {result.get('epochs')} epochs)", fontsize=10)
    ax.legend(fontsize=8)
    return save_png(fig, path)
