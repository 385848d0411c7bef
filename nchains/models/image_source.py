"""How a chain's images were chosen (``Chain.images_source``) and the one function that turns
such a record into the images.

``nchains extract`` writes a record from its arguments and gets its images from
:func:`images_from_source`; ``nchains export`` calls the same function on the record the chain
carries, so it rebuilds the very same tensor as long as the data has not changed (it checks the
result against ``Chain.images_hash``).

Records are JSON-serialisable dicts:

- ``{"kind": "default", "classes": [...] | None, "per_class": int, "seed": int,
  "confident": float | None}``: :func:`nchains.models.zoo.default_images` called with these arguments
  (the shipped Fashion-MNIST sample; ``classes`` None means all ten).
- ``{"kind": "folder", "path": str, "size": int, "preprocessing": "imagenet" | "fashion-mnist" |
  "none", "grayscale": bool, "classes": [...] | None, "per_class": int}``:
  :func:`nchains.models.images.load_image_folder` of the absolute ``path`` with ``size``,
  ``preprocessing`` and ``grayscale``; for a folder of class sub-folders, the first ``per_class``
  images (sorted file order) of each sub-folder named in ``classes`` (every sub-folder when None),
  in folder order. A flat folder gives all its images (``classes`` must be None, ``per_class``
  is unused).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

KINDS = ("default", "folder")


def default_source(classes: Optional[List[str]], per_class: int, seed: int,
                   confident: Optional[float]) -> Dict[str, Any]:
    """The record of :func:`nchains.models.zoo.default_images` called with these arguments."""
    return {"kind": "default", "classes": None if classes is None else list(classes), "per_class": per_class,
            "seed": seed, "confident": confident}


def folder_source(path, *, size: int, preprocessing: str, grayscale: bool, classes: Optional[List[str]],
                  per_class: int) -> Dict[str, Any]:
    """The record of an image folder (``path`` is made absolute)."""
    return {"kind": "folder", "path": os.path.abspath(os.fspath(path)), "size": size,
            "preprocessing": preprocessing, "grayscale": grayscale,
            "classes": None if classes is None else list(classes), "per_class": per_class}


def images_from_source(source: Dict[str, Any]) -> Tuple[torch.Tensor, str]:
    """The images a record describes.

    Args:
        source (dict): a record as described in this module (e.g. ``Chain.images_source``).

    Returns:
        tuple: ``images`` (Tensor[N, C, H, W], float32) and a short description of them
        (``"20 shipped Fashion-MNIST test images"``, ``"6 images from /data/region"``).

    Raises:
        ValueError: for a malformed record, or when the data it names cannot be loaded or does
            not hold the images asked for (unknown class, too few images...).
    """
    if not isinstance(source, dict) or source.get("kind") not in KINDS:
        kind = source.get("kind") if isinstance(source, dict) else source
        raise ValueError(f"images source {kind!r} is unknown (expected a dict with kind one of {KINDS})")
    try:
        if source["kind"] == "default":
            return _default_images(source)
        return _folder_images(source)
    except KeyError as exc:
        raise ValueError(f"images source of kind {source['kind']!r} lacks the field {exc}") from None


def _default_images(source: Dict[str, Any]) -> Tuple[torch.Tensor, str]:
    from nchains.models import zoo

    images, _, _ = zoo.default_images(source["classes"], per_class=source["per_class"], seed=source["seed"],
                                      confident=source["confident"])
    return images, f"{len(images)} shipped Fashion-MNIST test images"


class FolderSelection(NamedTuple):
    """The images a folder record gives, with what is known about them.

    Attributes:
        images (Tensor[N, C, H, W]): float32, preprocessed.
        labels (Tensor[N] or None): index into ``folder_classes`` (None for a flat folder).
        folder_classes (list[str] or None): every class sub-folder, sorted (None for a flat folder).
        available (dict class -> int): images each selected class sub-folder holds.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    folder_classes: Optional[List[str]]
    available: Dict[str, int]


def folder_selection(source: Dict[str, Any]) -> FolderSelection:
    """The images of a ``"folder"`` record, their labels and how many each class had."""
    from nchains.models.images import load_image_folder

    path, wanted, per_class = source["path"], source["classes"], source["per_class"]
    images, labels, folder_classes, _ = load_image_folder(
        path, size=source["size"], preprocessing=source["preprocessing"], grayscale=source["grayscale"])
    if wanted is not None:
        if folder_classes is None:
            raise ValueError(f"--classes needs --images DIR with one sub-folder per class; {path!r} is a flat folder")
        unknown = [c for c in wanted if c not in folder_classes]
        if unknown:
            raise ValueError(f"--classes {unknown} not found among the sub-folders {folder_classes}")
        repeated = sorted({c for c in wanted if wanted.count(c) > 1})
        if repeated:
            raise ValueError(f"--classes must not repeat a class, got {repeated} more than once")
    available: Dict[str, int] = {}
    if labels is not None:
        keep = torch.zeros(len(images), dtype=torch.bool)
        for c in (wanted if wanted is not None else folder_classes):
            members = torch.nonzero(labels == folder_classes.index(c)).flatten()
            available[c] = len(members)
            keep[members[:min(per_class, len(members))]] = True
        images, labels = images[keep], labels[keep]
    return FolderSelection(images, labels, folder_classes, available)


def _folder_images(source: Dict[str, Any]) -> Tuple[torch.Tensor, str]:
    images = folder_selection(source).images
    return images, f"{len(images)} images from {source['path']}"


def applied_preprocessing(spec: Optional[Dict[str, Any]], source: Optional[Dict[str, Any]]
                          ) -> Optional[Dict[str, Any]]:
    """Exactly what the images of a chain went through, for the manifest (``input.preprocessing``).

    One function of the chain's model spec and images source: a folder record says it
    (:func:`nchains.models.images.describe_preprocessing` of its preprocessing, size and
    channels); the shipped sample, and a chain of the shipped model without a record, are 28x28
    uint8 Fashion-MNIST images normalised with its mean and std. Anything else: None (unknown).
    """
    from nchains.models.images import describe_preprocessing

    kind = source.get("kind") if isinstance(source, dict) else None
    if kind == "folder":
        try:
            return describe_preprocessing(source["preprocessing"], source["size"], source["grayscale"])
        except (KeyError, ValueError, TypeError):
            return None
    if kind == "default" or (kind is None and isinstance(spec, dict) and spec.get("kind") == "default"):
        out = describe_preprocessing("fashion-mnist", 28, True)
        out["input"] = "grayscale 28x28, uint8 pixels p (the Fashion-MNIST format)"
        return out
    return None
