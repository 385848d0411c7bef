"""The shipped default model and images: a narrow ResNet trained on Fashion-MNIST.

``nchains extract`` must run out of the box, without downloads, so the package ships
a small network (``data/fashion_resnet.safetensors``, written by
``tools/train_default.py``) and 100 Fashion-MNIST test images per class
(``data/fashion_sample.npz``). The network uses torchvision's ``BasicBlock`` and
module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``...), so the papers' labels map onto it directly: ``Conv1``, ``L2B1C1`` =
``layer2.0.conv1``, ``L2B1SC`` = ``layer2.0.downsample.0``.

Example:
    >>> from nchains import zoo
    >>> model = zoo.default_model()
    >>> x, y, idx = zoo.default_images(["sandal", "bag"], per_class=5, seed=1)
    >>> x.shape, y.tolist()
    (torch.Size([10, 1, 28, 28]), [5, 5, 5, 5, 5, 8, 8, 8, 8, 8])
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

# The data half (idx files, statistics, normalisation) lives in its own module; re-exported here.
from nchains.models.fashion_mnist import (FASHION_MEAN, FASHION_MNIST_ROOT, FASHION_STD, load_fashion_mnist,
                                         normalize_fashion, read_idx)

__all__ = [
    "FASHION_CLASSES",
    "FASHION_CLASS_NAMES",
    "FASHION_MEAN",
    "FASHION_STD",
    "FASHION_MNIST_ROOT",
    "FashionResNet",
    "fashion_resnet",
    "read_idx",
    "load_fashion_mnist",
    "normalize_fashion",
    "fashion_sample",
    "default_model",
    "default_model_hash",
    "default_model_info",
    "default_class_names",
    "default_images",
]

#: Class slugs in label order (what the CLI accepts).
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
#: Human-readable class names in label order (as in the Fashion-MNIST paper).
FASHION_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DATA_DIR = Path(__file__).resolve().parent / "data"
_WEIGHTS = _DATA_DIR / "fashion_resnet.safetensors"
_SAMPLE = _DATA_DIR / "fashion_sample.npz"
_INFO = _DATA_DIR / "fashion_resnet.json"

_WIDTHS = (16, 32, 64, 128)
_BLOCKS = (2, 2, 2, 2)


# --------------------------------------------------------------------------- model


class FashionResNet(nn.Module):
    """ResNet-18 layout at a quarter of the width, for 1x28x28 inputs.

    Same module names as ``torchvision.models.ResNet`` (``conv1``, ``bn1``, ``relu``,
    ``layer1``..``layer4`` of ``BasicBlock`` with ``downsample`` where the shape
    changes, ``avgpool``, ``fc``) but a 3x3 stride-1 stem and no max-pool, so the
    feature maps are 28, 14, 7 and 4 pixels wide.

    Args:
        num_classes (int): Number of outputs of ``fc``.

    Shape:
        x (Tensor[N, 1, 28, 28]) normalised with :func:`normalize_fashion`
        -> logits (Tensor[N, num_classes]).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, _WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = _WIDTHS[0]
        for stage, (width, blocks) in enumerate(zip(_WIDTHS, _BLOCKS), start=1):
            stride = 1 if stage == 1 else 2
            layers = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                downsample = None
                if s != 1 or in_planes != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_planes, width, kernel_size=1, stride=s, bias=False),
                        nn.BatchNorm2d(width),
                    )
                layers.append(BasicBlock(in_planes, width, stride=s, downsample=downsample))
                in_planes = width
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)

        # torchvision's initialisation, including zero-init of each block's last BN
        # (a block starts as identity, which trains faster and better).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def fashion_resnet(num_classes: int = 10) -> FashionResNet:
    """A freshly initialised :class:`FashionResNet` (widths 16/32/64/128, 2 blocks each).

    Args:
        num_classes (int): Number of classes (outputs of ``fc``).

    Returns:
        FashionResNet: In training mode, randomly initialised. Use
        :func:`default_model` for the trained weights.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return FashionResNet(num_classes)


# --------------------------------------------------------------------------- shipped artifacts


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped data file {str(path)!r} is missing; the nchains install is incomplete "
            f"(in a source checkout, create it with `python tools/train_default.py`)"
        )
    return path


@functools.lru_cache(maxsize=1)
def _default_state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # safe format: no pickle, no code

    state = load_file(str(_require(_WEIGHTS)))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def default_model() -> FashionResNet:
    """The shipped Fashion-MNIST ResNet with trained weights, in eval mode.

    Each call returns a new module, so callers may modify it freely.

    Returns:
        FashionResNet: Float32, on the CPU, ``eval()`` mode. Expects inputs
        (Tensor[N, 1, 28, 28]) normalised with :func:`normalize_fashion`.
    """
    model = FashionResNet(len(FASHION_CLASSES))
    model.load_state_dict(_default_state_dict(), strict=True)
    return model.eval()


@functools.lru_cache(maxsize=1)
def default_model_hash() -> str:
    """SHA-256 of the shipped model's weights (:func:`nchains._util.io.hash_model`), computed once."""
    from nchains._util.io import hash_model

    return hash_model(default_model())


def default_model_info() -> dict:
    """Training record of the shipped model (accuracy, seed, command, mean/std...)."""
    return json.loads(_require(_INFO).read_text())


def default_class_names() -> list[str]:
    """Class slugs of the default model in label order (``["t-shirt", ..., "ankle-boot"]``)."""
    return list(FASHION_CLASSES)


@functools.lru_cache(maxsize=1)
def _sample_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(_require(_SAMPLE), allow_pickle=False) as z:
        return z["images"].copy(), z["labels"].astype(np.int64), z["indices"].astype(np.int64)


def fashion_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shipped sample of the Fashion-MNIST test split: 100 images per class.

    Returns:
        tuple: ``images`` (Tensor[1000, 28, 28], uint8), ``labels`` (Tensor[1000],
        int64) and ``indices`` (Tensor[1000], int64): positions in the original
        10000-image test split.
    """
    images, labels, indices = _sample_arrays()
    return tuple(torch.from_numpy(a.copy()) for a in (images, labels, indices))


@torch.no_grad()
def _probabilities(model: nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else x.dtype
        probs = [
            torch.softmax(model(x[i : i + batch_size].to(device, dtype)).float(), dim=1).cpu()
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(probs)


@functools.lru_cache(maxsize=1)
def _default_sample_probabilities() -> torch.Tensor:
    images, _, _ = fashion_sample()
    return _probabilities(default_model(), normalize_fashion(images).unsqueeze(1))


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _class_index(c: object) -> int:
    if isinstance(c, torch.Tensor) and c.ndim == 0 and c.dtype in _INT_DTYPES:
        c = int(c)
    if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
        if 0 <= int(c) < len(FASHION_CLASSES):
            return int(c)
    elif isinstance(c, str):
        key = c.strip().lower()
        for i, (slug, name) in enumerate(zip(FASHION_CLASSES, FASHION_CLASS_NAMES)):
            if key in (slug, name.lower()):
                return i
    raise ValueError(
        f"classes: unknown class {c!r}; accepted are the names "
        f"{', '.join(FASHION_CLASSES)} or the integers 0-{len(FASHION_CLASSES) - 1}"
    )


def default_images(
    classes: str | int | Sequence[str | int] | None = None,
    per_class: int = 10,
    seed: int = 0,
    confident: float | None = 0.95,
    model: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Picks images of the requested classes from the shipped Fashion-MNIST sample.

    For each class the 100 sample images are shuffled with a generator seeded by
    ``(seed, class)`` and the first ``per_class`` that pass the confidence filter are
    kept. So the picks for a class do not depend on which other classes are requested,
    and a smaller ``per_class`` gives a prefix of a larger one. Like the NeuroChains
    paper, by default only images the model classifies confidently are used.

    Args:
        classes (str | int | Sequence[str | int] | None): Class slugs (see
            :data:`FASHION_CLASSES`; human names such as ``"Ankle boot"`` also work) or
            label integers. ``None`` means all 10 classes.
        per_class (int): Images per class, 1..100.
        seed (int): Seed of the pick; same seed, same images.
        confident (float | None): Keep only images whose softmax probability of their
            true class is ``>= confident`` (in (0, 1]). ``None`` disables the filter.
        model (nn.Module | None): Model for the confidence filter, fed
            (Tensor[N, 1, 28, 28]) normalised images; defaults to :func:`default_model`.

    Returns:
        tuple: ``images`` (Tensor[N, 1, 28, 28], float32, normalised), ``labels``
        (Tensor[N], int64) and ``indices`` (Tensor[N], int64, positions in the
        Fashion-MNIST test split), grouped by class in the requested order, with
        ``N = len(classes) * per_class``.

    Raises:
        ValueError: If a class is unknown or repeated, ``per_class`` is out of range,
            ``confident`` is not in (0, 1], or a class has fewer than ``per_class``
            images passing the filter.
        TypeError: If ``per_class`` or ``seed`` is not an int, or ``classes`` or
            ``confident`` has the wrong type.
    """
    if classes is None:
        wanted = list(range(len(FASHION_CLASSES)))
    elif isinstance(classes, (str, int, np.integer)) or (
        isinstance(classes, torch.Tensor) and classes.ndim == 0
    ):
        wanted = [_class_index(classes)]
    else:
        try:
            requested = list(classes)
        except TypeError:
            raise TypeError(
                f"classes must be a class name, an int, a sequence of them or None, "
                f"got {type(classes).__name__}"
            ) from None
        if not requested:
            raise ValueError("classes must name at least one class, got an empty sequence")
        wanted = [_class_index(c) for c in requested]
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"classes must not repeat a class, got {requested!r}")
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)):
        raise TypeError(f"per_class must be an int, got {type(per_class).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if confident is not None:
        if isinstance(confident, bool) or not isinstance(confident, (int, float)):
            raise TypeError(f"confident must be a float or None, got {type(confident).__name__}")
        if not 0.0 < float(confident) <= 1.0:
            raise ValueError(f"confident must be in (0, 1] or None, got {confident}")

    images, labels, indices = fashion_sample()
    available = int(torch.bincount(labels, minlength=len(FASHION_CLASSES)).min())
    if not 1 <= per_class <= available:
        raise ValueError(
            f"per_class must be between 1 and {available} (images per class in the "
            f"shipped sample), got {per_class}"
        )

    if confident is None:
        probs = None
    elif model is None:
        probs = _default_sample_probabilities()
    else:
        probs = _probabilities(model, normalize_fashion(images).unsqueeze(1))

    picked = []
    for c in wanted:
        members = np.flatnonzero(labels.numpy() == c)
        order = members[np.random.default_rng([int(seed), c]).permutation(len(members))]
        if probs is not None:
            order = order[probs[order, c].numpy() >= float(confident)]
        if len(order) < per_class:
            raise ValueError(
                f"per_class={per_class} but only {len(order)} of the {len(members)} sample "
                f"images of class {FASHION_CLASSES[c]!r} (in classes) have model probability "
                f">= {confident}; lower per_class or confident, or pass confident=None"
            )
        picked.append(order[:per_class])
    rows = torch.from_numpy(np.concatenate(picked))
    x = normalize_fashion(images[rows]).unsqueeze(1)
    return x, labels[rows].clone(), indices[rows].clone()
