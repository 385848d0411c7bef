"""Fashion-MNIST as data: its idx files (Debian's ``dataset-fashion-mnist``, never
downloaded), its pixel statistics and the normalisation the shipped model expects.

:mod:`nchains.models.zoo` re-exports everything here.

Example:
    >>> from nchains.models.fashion_mnist import load_fashion_mnist, normalize_fashion
    >>> images, labels = load_fashion_mnist("test")       # uint8 [10000, 28, 28], int64 [10000]
    >>> x = normalize_fashion(images[:4]).unsqueeze(1)     # float32 [4, 1, 28, 28]
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FASHION_MEAN", "FASHION_STD", "FASHION_MNIST_ROOT", "read_idx", "load_fashion_mnist",
           "normalize_fashion"]

#: Pixel mean and std of the Fashion-MNIST train split, on the [0, 1] scale.
FASHION_MEAN: float = 0.2860
FASHION_STD: float = 0.3530

#: Where Debian's ``dataset-fashion-mnist`` puts the idx files; override with the
#: ``NCHAINS_FASHION_MNIST_ROOT`` environment variable or the ``root`` argument.
FASHION_MNIST_ROOT: str = os.environ.get(
    "NCHAINS_FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"
)


# idx type byte -> numpy big-endian dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (the MNIST format), gzip-compressed or not.

    Args:
        path (str | PathLike): An ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        np.ndarray: Array of the shape and dtype the header declares (native byte
        order), e.g. uint8 ``[N, 28, 28]`` for images, uint8 ``[N]`` for labels.

    Raises:
        ValueError: If ``path`` does not exist or is not a well-formed idx file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a file")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"path {str(path)!r} could not be read: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"path {str(path)!r} is not an idx file (bad magic number {raw[:4]!r})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path {str(path)!r} is truncated: header declares {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"path {str(path)!r} holds {len(raw) - header} data bytes but its header "
            f"declares shape {shape} of {dtype.name} ({expected} bytes)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}


def load_fashion_mnist(
    split: str = "test", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads a Fashion-MNIST split from local idx files (never downloads).

    Args:
        split (str): ``"train"`` (60000 images) or ``"test"`` (10000; ``"t10k"`` also
            accepted).
        root (str | PathLike | None): Directory holding
            ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Defaults to
            :data:`FASHION_MNIST_ROOT` (Debian package ``dataset-fashion-mnist``).

    Returns:
        tuple: ``images`` (Tensor[N, 28, 28], uint8) and ``labels`` (Tensor[N], int64).

    Raises:
        ValueError: If ``split`` is unknown or the files are missing or malformed.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of 'train', 'test', 't10k'; got {split!r}")
    root = Path(FASHION_MNIST_ROOT if root is None else root)
    prefix = _SPLIT_PREFIX[split]
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [root / f"{prefix}-{kind}-ubyte.gz", root / f"{prefix}-{kind}-ubyte"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ValueError(
                f"Fashion-MNIST {split} file not found: {str(candidates[0])!r} (nor the "
                f"uncompressed file). Install the Debian package 'dataset-fashion-mnist' "
                f"(apt-get install dataset-fashion-mnist), or pass root= / set "
                f"NCHAINS_FASHION_MNIST_ROOT to a directory with the idx files."
            )
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} files in {str(root)!r} are inconsistent: images "
            f"{images.shape}, labels {labels.shape}"
        )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def normalize_fashion(images: torch.Tensor) -> torch.Tensor:
    """Maps uint8 pixels to the model's input scale: ``(x / 255 - mean) / std``.

    Args:
        images (Tensor[..., H, W], uint8): Any shape; e.g. ``[N, 1, 28, 28]``.

    Returns:
        Tensor[..., H, W]: float32, same shape.

    Raises:
        TypeError: If ``images`` is not a uint8 tensor.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of uint8, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must have dtype torch.uint8 (raw pixels), got {images.dtype}")
    return (images.float() / 255.0 - FASHION_MEAN) / FASHION_STD
