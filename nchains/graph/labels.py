"""Human labels of layers, blocks and filters, as the NeuroChains paper writes them.

Module paths (``layer4.0.conv2``) identify layers for machines; people read the papers'
labels. ResNet-style paths get ``Conv1``, ``L<stage>B<block>C<k>``, ``L<stage>B<block>SC``
(shortcut) and ``L<stage>B<block>`` (block); a conv that is element ``i`` of a top-level
``nn.Sequential`` (VGG ``features.i``) gets ``L<i>`` and the linears of such a Sequential get
``FC<k>`` (k-th linear of the model, from 1); so do the elements of a Sequential model
itself (path ``i``). Anything else keeps its module path. A filter
is ``<layer label>_<index>``, e.g. ``L4B1C2_48``.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Tuple

from torch import nn

_STEM = re.compile(r"^conv(\d+)$")
_RES_CONV = re.compile(r"^layer(\d+)\.(\d+)\.conv(\d+)$")
_RES_SHORTCUT = re.compile(r"^layer(\d+)\.(\d+)\.downsample\.0$")
_RES_BLOCK = re.compile(r"^layer(\d+)\.(\d+)$")
_SEQ_ELEMENT = re.compile(r"^([A-Za-z_]\w*)\.(\d+)$")
_FILTER = re.compile(r"^(.+)_(\d+)$")


def _split_call(name: str) -> Tuple[str, str]:
    """``'a.b@1'`` -> ``('a.b', '@1')``: repeated calls of one module keep a call suffix."""
    path, sep, call = name.partition("@")
    return path, sep + call


def _label_of_path(root: nn.Module, path: str, kind: str, linear_index: int) -> Optional[str]:
    if kind == "conv":
        m = _STEM.match(path)
        if m:
            return f"Conv{m.group(1)}"
        m = _RES_CONV.match(path)
        if m:
            return f"L{m.group(1)}B{int(m.group(2)) + 1}C{m.group(3)}"
        m = _RES_SHORTCUT.match(path)
        if m:
            return f"L{m.group(1)}B{int(m.group(2)) + 1}SC"
    if kind == "block":
        m = _RES_BLOCK.match(path)
        if m:
            return f"L{m.group(1)}B{int(m.group(2)) + 1}"
        return None
    if kind == "linear" and path == "fc":
        return "FC"
    m = _SEQ_ELEMENT.match(path)
    parent = getattr(root, m.group(1), None) if m else root
    if (m or path.isdigit()) and isinstance(parent, nn.Sequential):
        return f"L{path.rpartition('.')[2]}" if kind == "conv" else f"FC{linear_index}"
    return None


def make_labels(root: nn.Module, entries: Iterable[Tuple[str, str]]) -> Dict[str, str]:
    """Label every named layer or block.

    Args:
        root (nn.Module): the analysed model (to tell top-level Sequentials apart).
        entries: ``(name, kind)`` pairs in graph order; ``name`` is a module path with an
            optional ``@<call>`` suffix, ``kind`` is ``"conv"``, ``"linear"`` or ``"block"``.

    Returns:
        dict name -> label. Labels are unique: names whose pattern label would collide with
        another's (or with another name) keep their module path.
    """
    entries = list(entries)
    proposed: Dict[str, Optional[str]] = {}
    linear_index = 0
    for name, kind in entries:
        if kind not in ("conv", "linear", "block"):
            raise ValueError(f"kind must be 'conv', 'linear' or 'block', got {kind!r}")
        path, call = _split_call(name)
        if kind == "linear":
            linear_index += 1
        label = _label_of_path(root, path, kind, linear_index)
        proposed[name] = None if label is None else label + call
    counts: Dict[str, int] = {}
    for label in proposed.values():
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    names = set(proposed)
    labels = {}
    for name, label in proposed.items():
        clash = label is None or counts[label] > 1 or (label in names and label != name)
        labels[name] = name if clash else label
    return labels


def filter_label(layer_label: str, index: int) -> str:
    """``('L4B1C2', 48)`` -> ``'L4B1C2_48'``."""
    return f"{layer_label}_{int(index)}"


def split_filter_label(label: str) -> Tuple[str, int]:
    """``'L4B1C2_48'`` -> ``('L4B1C2', 48)``.

    Raises:
        ValueError: if ``label`` does not end in ``_<index>``.
    """
    m = _FILTER.match(label)
    if not m:
        raise ValueError(f"filter label must look like '<layer label>_<index>' (e.g. 'L4B1C2_48'), "
                         f"got {label!r}")
    return m.group(1), int(m.group(2))
