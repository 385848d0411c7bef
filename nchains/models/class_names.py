"""Naming a model's outputs for a folder of the user's images.

The names come from the model when it knows them (:func:`nchains.models.spec.spec_class_names`:
the shipped model's Fashion-MNIST classes, ImageNet's categories) or from the folder's class
sub-folders. When both exist, sub-folders are mapped onto the model's classes by name
(``ankle-boot/``, ``Ankle boot/`` and ``ankle_boot/`` all name the shipped model's class 9), which
gives each image a label to check the model against.
"""

from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Sequence

import torch

__all__ = ["ClassNaming", "name_classes", "label_agreement"]


class ClassNaming(NamedTuple):
    """How a folder's classes relate to a model's outputs.

    Attributes:
        class_names (list[str] or None): names of the model's outputs (None: unknown).
        output_of (list[int] or None): for each folder class (sorted sub-folder order), the model
            output it is; None when the folder's classes cannot be tied to outputs.
        how (str): ``"model"`` (names from the model, folder names matched onto them),
            ``"model-unmatched"`` (names from the model; some sub-folder matches none),
            ``"folders"`` (names are the sub-folders, one per output, in order) or ``"none"``.
    """

    class_names: Optional[List[str]]
    output_of: Optional[List[int]]
    how: str


def _slug(name: str) -> str:
    return re.sub(r"[\s_/\-]+", "-", str(name).strip().lower()).strip("-")


def _aliases(model_names: Sequence[str], default_model: bool) -> List[List[str]]:
    """Per output, the slugs that name it (the shipped model also answers to its human names)."""
    out = [[_slug(n)] for n in model_names]
    if default_model:
        from nchains.models.zoo import FASHION_CLASS_NAMES

        for i, human in enumerate(FASHION_CLASS_NAMES[:len(out)]):
            out[i].append(_slug(human))
    return out


def name_classes(folder_classes: Optional[Sequence[str]], model_names: Optional[Sequence[str]], n_out: int,
                 default_model: bool = False) -> ClassNaming:
    """Ties class sub-folders to a model's ``n_out`` outputs.

    Args:
        folder_classes (list[str] or None): the folder's class sub-folders (None: a flat folder).
        model_names (list[str] or None): what the model calls its outputs, if known.
        n_out (int): number of model outputs.
        default_model (bool): the shipped model (its human class names are accepted too).

    Returns:
        ClassNaming: names of the outputs and, when possible, the output of each sub-folder.
    """
    if model_names is not None:
        if folder_classes:
            index = {slug: i for i, slugs in enumerate(_aliases(model_names, default_model)) for slug in slugs}
            outputs = [index.get(_slug(c)) for c in folder_classes]
            if all(o is not None for o in outputs) and len(set(outputs)) == len(outputs):
                return ClassNaming(list(model_names), outputs, "model")
            return ClassNaming(list(model_names), None, "model-unmatched")
        return ClassNaming(list(model_names), None, "model")
    if folder_classes and len(folder_classes) == n_out:
        return ClassNaming(list(folder_classes), list(range(n_out)), "folders")
    return ClassNaming(None, None, "none")


def label_agreement(logits: torch.Tensor, labels: torch.Tensor, output_of: Sequence[int]) -> float:
    """Fraction of images whose predicted output is their folder's class.

    Args:
        logits (Tensor[N, K]): the original model's outputs on the images.
        labels (Tensor[N]): folder class index of each image.
        output_of (list[int]): model output of each folder class.
    """
    target = torch.as_tensor(list(output_of), dtype=torch.long)[labels]
    return float((logits.argmax(1).cpu() == target).float().mean())


def chain_region(classes: Sequence[int], class_names: Optional[Sequence[str]]) -> dict:
    """The local region a chain was extracted for, for manifests and ``nchains inspect``.

    Args:
        classes (list[int]): outputs the original model predicts on the chain's images.
        class_names (list[str] or None): names of all outputs.

    Returns:
        dict: ``classes``, their ``names`` (the index as text when unnamed) and a ``note`` that the
        compact model is only expected to agree with the original inside this region.
    """
    names = [class_names[c] if class_names and 0 <= c < len(class_names) else str(c) for c in map(int, classes)]
    return {"classes": [int(c) for c in classes], "names": names,
            "note": f"extracted for images the model classifies as {', '.join(names) or '(none)'}; outside this "
                    "region the compact model is not expected to agree with the original"}
