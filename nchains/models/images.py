"""Loading the user's own images from a folder (offline, no dataset downloads).

Two layouts are accepted:

- a flat folder of images (``dir/a.png, dir/b.jpg``): no labels;
- a folder of class sub-folders (``dir/cat/1.png, dir/dog/2.png``): sub-folder names,
  sorted, are the class names, and their positions the labels (as torchvision's
  ``ImageFolder``).

Example:
    >>> from nchains.models.images import load_image_folder
    >>> x, labels, classes, files = load_image_folder("imgs/")   # ImageNet preprocessing
    >>> x.shape
    torch.Size([12, 3, 224, 224])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "PREPROCESSING", "describe_preprocessing",
           "load_image_folder"]

#: File extensions recognised as images (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)
#: ImageNet channel statistics (RGB, [0, 1] scale), as used by torchvision's weights.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Accepted ``preprocessing`` values.
PREPROCESSING: tuple[str, ...] = ("imagenet", "fashion-mnist", "none")


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _read(path: Path, grayscale: bool) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if grayscale else "RGB")
            return TF.pil_to_tensor(im)  # uint8 [C, H, W]
    except Image.DecompressionBombError as e:  # a header claiming a huge size: refuse before decoding
        raise ValueError(f"path: image file {str(path)!r} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"path: cannot read image file {str(path)!r}: {e}") from None


def _statistics(preprocessing: str, grayscale: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of a normalising preprocessing, on the [0, 1] scale."""
    if preprocessing == "fashion-mnist":
        from nchains.models.fashion_mnist import FASHION_MEAN, FASHION_STD

        return (FASHION_MEAN,) * (1 if grayscale else 3), (FASHION_STD,) * (1 if grayscale else 3)
    if grayscale:  # one channel: the luminance-weighted ImageNet statistics
        w = (0.299, 0.587, 0.114)
        return (sum(a * b for a, b in zip(w, IMAGENET_MEAN)),), (sum(a * b for a, b in zip(w, IMAGENET_STD)),)
    return IMAGENET_MEAN, IMAGENET_STD


def _resize_side(preprocessing: str, size: int) -> int:
    """The shorter side an image is resized to before the centre crop."""
    return round(size * 256 / 224) if preprocessing == "imagenet" else size


def _preprocess(img: torch.Tensor, preprocessing: str, size: int, grayscale: bool) -> torch.Tensor:
    if preprocessing == "none":  # only resize (if not already size x size) and scale to [0, 1]
        if tuple(img.shape[-2:]) != (size, size):
            img = TF.resize(img, [size, size], antialias=True)
        return img.float() / 255.0
    # torchvision's ImageNet eval recipe (shorter side to size*256/224, centre crop, always); for
    # Fashion-MNIST the shorter side goes to size itself, and a 28x28 image stays untouched.
    if preprocessing == "imagenet" or tuple(img.shape[-2:]) != (size, size):
        img = TF.resize(img, [_resize_side(preprocessing, size)], antialias=True)
        img = TF.center_crop(img, [size, size])
    mean, std = _statistics(preprocessing, grayscale)
    return TF.normalize(img.float() / 255.0, list(mean), list(std))


def describe_preprocessing(preprocessing: str, size: int, grayscale: bool) -> dict:
    """What :func:`load_image_folder` does to each image, as a JSON-able dict (the manifest's
    ``input.preprocessing``): channels, resize, crop, scaling formula, mean and std."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    out = {"kind": preprocessing, "size": size, "channels": "grayscale" if grayscale else "RGB",
           "input": "an image file of pixels p in 0..255"}
    if preprocessing == "none":
        out.update(resize=f"to {size}x{size} (antialiased bilinear) unless already that size",
                   formula="x = p / 255")
        return out
    mean, std = _statistics(preprocessing, grayscale)
    out.update(resize=f"shorter side to {_resize_side(preprocessing, size)} (antialiased bilinear), then centre "
                      f"crop {size}x{size}" + ("" if preprocessing == "imagenet" else
                                         f"; a {size}x{size} image is left as it is"),
               formula="x = (p / 255 - mean) / std", mean=list(mean), std=list(std))
    return out


def load_image_folder(
    path: str | os.PathLike,
    *,
    size: int = 224,
    preprocessing: str = "imagenet",
    grayscale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, list[Path]]:
    """Loads every image of a folder (or of its class sub-folders) into one batch.

    Args:
        path (str | PathLike): A folder of images, or a folder of class sub-folders
            of images. Files are taken in sorted order; hidden files, files with
            other extensions and sub-folders without images are ignored. All images
            are decoded into one batch, so keep folders to a few thousand images.
        size (int): Output height and width.
        preprocessing (str): ``"imagenet"``: resize the shorter side to
            ``size * 256 / 224`` (256 for 224), centre-crop ``size x size``, scale to
            [0, 1] and normalise with :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`.
            ``"fashion-mnist"``: as ``"imagenet"`` but the shorter side goes to ``size`` and
            the statistics are Fashion-MNIST's (a ``size x size`` image is only normalised, so
            28x28 Fashion-MNIST PNGs give exactly the shipped model's inputs).
            ``"none"``: resize to ``size x size`` if needed and scale to [0, 1].
        grayscale (bool): Load one luminance channel instead of RGB (with
            ``"imagenet"``, normalised with the luminance-weighted ImageNet statistics).

    Returns:
        tuple: ``images`` (Tensor[N, C, size, size], float32, C = 1 if grayscale else
        3); ``labels`` (Tensor[N], int64) and ``class_names`` (list[str]) for the
        sub-folder layout, otherwise ``None`` and ``None``; ``files`` (list[Path]) of
        the N images in batch order.

    Raises:
        ValueError: If ``path`` is not a directory, holds no images, mixes images and
            class sub-folders, or holds a file that cannot be decoded; if ``size`` or
            ``preprocessing`` is invalid.
        TypeError: If ``size`` is not an int or ``grayscale`` not a bool.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    if not isinstance(grayscale, bool):
        raise TypeError(f"grayscale must be a bool, got {type(grayscale).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or PathLike, got {type(path).__name__}")
    root = Path(path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ValueError(
            f"path {str(root)!r} {what}; expected a folder of images or of class sub-folders"
        )

    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    flat = [p for p in entries if _is_image(p)]
    subdirs = [p for p in entries if p.is_dir()]
    if flat and subdirs:
        raise ValueError(
            f"path {str(root)!r} mixes image files ({flat[0].name}, ...) and sub-folders "
            f"({subdirs[0].name}, ...); use either a flat folder or one sub-folder per class"
        )

    if flat:
        files, labels, class_names = flat, None, None
    else:
        class_dirs = [d for d in subdirs if any(_is_image(p) for p in d.iterdir())]
        if not class_dirs:
            raise ValueError(
                f"path {str(root)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}) "
                f"directly or in class sub-folders"
            )
        class_names = [d.name for d in class_dirs]
        files, label_list = [], []
        for label, d in enumerate(class_dirs):
            members = sorted(p for p in d.iterdir() if _is_image(p))
            files += members
            label_list += [label] * len(members)
        labels = torch.tensor(label_list, dtype=torch.int64)

    images = torch.stack(
        [_preprocess(_read(f, grayscale), preprocessing, size, grayscale) for f in files]
    )
    return images, labels, class_names, files
