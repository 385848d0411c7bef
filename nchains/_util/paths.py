"""Dotted attribute paths on module trees (``layer1.0.conv1``): read one, test one, and set
one, making the missing parents as empty modules. Used where fx graphs are rebuilt onto new
roots (the scored model, the model importer) and where graph constants are read.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def fetch(root: Any, path: str) -> Any:
    """The attribute at ``path`` below ``root`` (module, parameter, buffer or constant)."""
    for atom in path.split("."):
        root = getattr(root, atom)
    return root


def missing(root: Any, path: str) -> bool:
    """True when some atom of ``path`` does not exist below ``root``."""
    try:
        fetch(root, path)
    except AttributeError:
        return True
    return False


def set_path(root: nn.Module, path: str, value: Any) -> None:
    """Puts ``value`` at ``path``: a module as a submodule, an ``nn.Parameter`` as a
    parameter, anything else (a tensor or None) as a buffer."""
    *parents, leaf = path.split(".")
    for atom in parents:
        if not hasattr(root, atom):
            root.add_module(atom, nn.Module())
        root = getattr(root, atom)
    if isinstance(value, nn.Module):
        root.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        root.register_parameter(leaf, value)
    else:
        root.register_buffer(leaf, value)
