"""Helpers of the scored model's fx rewrite: out-of-place ops, private frozen copies of the
analysed model's modules, attribute-safe keys, flat parameter parts and gate values.
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: torch.relu}


def _out_of_place(node: fx.Node) -> None:
    """In-place ops could overwrite a region's input before its gate reads it."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        node.target = node.target[:-1]
    if node.op != "call_function":
        return
    node.target = _INPLACE.get(node.target, node.target)
    if node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    try:
        names = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return
    if "inplace" in names and len(node.args) > names.index("inplace"):
        args = list(node.args)
        args[names.index("inplace")] = False
        node.args = tuple(args)


def _own_copy(value):
    """Frozen private copy (without hooks) of a module or tensor of the analysed model."""
    if isinstance(value, nn.Module):
        value = copy.deepcopy(value).requires_grad_(False)
        for m in value.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m._backward_hooks.clear()
        return value
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _keys(names) -> Dict[str, str]:
    """Attribute-safe keys for module paths: ``layer1.0.conv1`` -> ``layer1__0__conv1``."""
    keys: Dict[str, str] = {}
    for name in names:
        key = name.replace(".", "__").replace("@", "_call")
        while key in keys.values():
            key += "_"
        keys[name] = key
    return keys


class _FlatParts:
    """Per-unit (per-region) parts of a flat tensor attribute in a graph being built: the
    attribute is read and split once, at first use (so after the placeholders), and each
    part is a ``getitem`` of that split; every node made is tagged ``nchains_param``."""

    def __init__(self, graph: fx.Graph, attr: str, split_args: tuple):
        self.graph, self.attr, self.split_args = graph, attr, split_args
        self.split: Optional[fx.Node] = None

    def __getitem__(self, index: int) -> fx.Node:
        if self.split is None:
            flat = self.graph.get_attr(self.attr)
            fn = torch.split if self.split_args else torch.unbind
            self.split = self.graph.call_function(fn, (flat, *self.split_args))
            flat.meta, self.split.meta = {"nchains_param": True}, {"nchains_param": True}
        item = self.graph.call_function(operator.getitem, (self.split, index))
        item.meta = {"nchains_param": True}
        return item


def _gate_value(gate) -> int:
    value = float(gate.item() if isinstance(gate, torch.Tensor) else gate)
    if value not in (0.0, 1.0):
        raise ValueError(f"gates values must be 0 or 1, got {gate!r}")
    return int(value)
