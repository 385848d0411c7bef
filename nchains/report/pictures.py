"""Small pictures for the report as ``data:`` PNG URIs: images shown as the model saw them
(each one scaled to its own range), heat maps through a colour map, overlays, strips.

PIL encodes the PNGs (a matplotlib figure per thumbnail would cost ~0.1 s each; the shipped
chain's report has hundreds of thumbnails). Arrays are ``float`` numpy, ``[H, W]`` (gray or a
map) or ``[H, W, 3]`` (RGB) in ``[0, 1]``.
"""

from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["colorize", "display_image", "overlay", "png_uri", "strip"]

#: Red = high, blue = low, as the papers' figures (score nodes, SMOE featuremaps).
CMAP = "jet"


def display_image(image: torch.Tensor) -> np.ndarray:
    """``image`` (Tensor[C, H, W], preprocessed) as ``[H, W]`` (1 channel) or ``[H, W, 3]`` in
    [0, 1], scaled by its own min and max: any normalisation (ImageNet's, Fashion-MNIST's, none)
    reads the same, and a constant image is mid-gray."""
    x = image.detach().double().cpu()
    if x.shape[0] not in (1, 3):
        x = x[:3] if x.shape[0] > 3 else x[:1]
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else torch.full_like(x, 0.5)
    arr = x.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[2] == 1 else arr


def normalise_map(values: np.ndarray) -> np.ndarray:
    """``values`` scaled to [0, 1] by its min and max (zeros when constant)."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def colorize(values: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """``values`` ``[H, W]`` in [0, 1] through the colour map: ``[H, W, 3]``."""
    from matplotlib import colormaps

    return colormaps[cmap](np.clip(values, 0.0, 1.0))[..., :3]


def _rgb(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A heat map ``[H, W]`` in [0, 1] (coloured) blended over a display image of the same size."""
    return (1 - alpha) * _rgb(image) + alpha * colorize(heat)


def strip(pictures: Sequence[np.ndarray], gap: int = 1) -> np.ndarray:
    """Pictures of one height side by side with white ``gap``-pixel columns between them (RGB)."""
    h = pictures[0].shape[0]
    parts = []
    for i, p in enumerate(pictures):
        if i:
            parts.append(np.ones((h, gap, 3)))
        parts.append(_rgb(p))
    return np.concatenate(parts, axis=1)


def png_uri(arr: np.ndarray, scale: Optional[int] = None, min_size: int = 64, max_size: int = 160) -> str:
    """``data:image/png;base64,...`` of ``arr`` (``[H, W]`` or ``[H, W, 3]`` in [0, 1]),
    enlarged by nearest-neighbour to at least ``min_size`` pixels high (or by ``scale``) so a
    28x28 digit stays sharp in the browser; one taller than ``max_size`` (a 224x224 ImageNet
    image) is shrunk to that height, so the page stays light."""
    from PIL import Image

    data = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(data, mode="L" if data.ndim == 2 else "RGB")
    factor = scale if scale is not None else max(1, -(-min_size // img.height))
    if factor > 1:
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    elif img.height > max_size:
        img = img.resize((max(1, round(img.width * max_size / img.height)), max_size), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
