"""Writing the compact fx graph: the channel state of a tensor and the primitives that emit
nodes, buffers and modules, including widening a subset of channels to a larger channel set
(``index_add`` or ``gather``). See :mod:`nchains.compact` for the channel state.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .analysis import ModelGraph


@dataclass(eq=False)
class _State:
    """Channel state of one tensor of the original graph (see :mod:`nchains.compact`)."""

    node: Optional[fx.Node]
    live: List[int]
    const: torch.Tensor

    @property
    def channels(self) -> int:
        return self.const.shape[0]


def _nonzero(t: torch.Tensor) -> bool:
    return bool(t.numel()) and bool((t != 0).any())


def _positions(live: Sequence[int], subset: Sequence[int]) -> List[int]:
    where = {c: i for i, c in enumerate(live)}
    return [where[c] for c in subset]


def _detached(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).eval().requires_grad_(False)
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "inplace"):
            m.inplace = False
    return module


class _Emitter:
    """State of one compact build and the primitives that write its graph; the graph walk
    (:class:`nchains.compact._Builder`) and the units (:mod:`nchains._compact_units`) use them."""

    def __init__(self, graph: ModelGraph, scores: Dict[str, torch.Tensor], gates: Dict[str, int],
                 keep_scores: bool, dtype: torch.dtype, scatter: str):
        self.graph, self.gm = graph, graph.graph_module
        self.scatter = scatter
        self.scores, self.gates, self.keep_scores, self.dtype = scores, gates, keep_scores, dtype
        self.g = fx.Graph()
        self.root = nn.Module()
        self.env: Dict[fx.Node, Any] = {}
        self.full_cache: Dict[_State, fx.Node] = {}
        self.names: set = set()
        self.layers: Dict[str, Dict[str, Any]] = {}
        self.batch: Optional[fx.Node] = None
        self.input: Optional[fx.Node] = None

    # ---- emitting ------------------------------------------------------------------------

    def _name(self, hint: str) -> str:
        base = name = hint.replace(".", "_").replace("@", "_call")
        k = 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def module(self, module: nn.Module, hint: str) -> str:
        name = self._name(hint)
        for m in module.modules():
            if hasattr(m, "inplace"):
                m.inplace = False
        self.root.add_module(name, module)
        return name

    def buffer(self, value: torch.Tensor, hint: str) -> fx.Node:
        name = self._name(hint)
        self.root.register_buffer(name, value.detach().clone())
        return self.g.get_attr(name)

    def call(self, fn, *args) -> fx.Node:
        return self.g.call_function(fn, tuple(args))

    def zeros(self, rest: Sequence[int]) -> fx.Node:
        """``Tensor[N, *rest]`` of zeros, N the dynamic batch size of the input."""
        return self.g.call_method("new_zeros", (self.input, (self.batch, *rest)))

    def add_const(self, node: fx.Node, const: torch.Tensor, hint: str) -> fx.Node:
        """``node + const`` (broadcast over the batch), skipped when ``const`` is zero."""
        if not _nonzero(const):
            return node
        return self.call(operator.add, node, self.buffer(const.to(self.dtype), hint))

    def expand(self, node: fx.Node, live: List[int], target: List[int], rank: int, hint: str) -> fx.Node:
        """``node`` (channels ``live``) widened to channels ``target`` with zero channels:
        ``pad`` one zero channel, then ``index_select`` (a Gather in ONNX)."""
        if live == target:
            return node
        pad = (0, 0) * (rank - 2) + (0, 1)
        padded = self.call(F.pad, node, pad)
        where = {c: i for i, c in enumerate(live)}
        gather = torch.as_tensor([where.get(c, len(live)) for c in target], dtype=torch.long)
        return self.call(torch.index_select, padded, 1, self.buffer(gather, f"{hint}_gather"))

    def scatter_add(self, base: Optional[fx.Node], node: fx.Node, live: List[int], target: List[int],
                    rest: Sequence[int], hint: str) -> fx.Node:
        """``base + node`` where ``node`` holds the subset ``live`` of the channels ``target``
        of ``base`` (zeros when ``base`` is None)."""
        if self.scatter == "gather":
            wide = self.expand(node, live, target, 2 + len(rest), hint)
            return wide if base is None else self.call(operator.add, base, wide)
        if base is None:
            base = self.zeros((len(target), *rest))
        idx = self.buffer(torch.as_tensor(_positions(target, live), dtype=torch.long), f"{hint}_index")
        return self.call(torch.index_add, base, 1, idx, node)

    def materialize(self, s: _State, target: Sequence[int], hint: str) -> fx.Node:
        """A tensor holding channels ``target`` (a sorted superset of ``s.live``)."""
        target = list(target)
        if s.node is not None and s.live == target:
            return s.node
        rest = tuple(s.const.shape[1:])
        const = s.const[torch.as_tensor(target, dtype=torch.long)]
        if s.node is None:
            return self.add_const(self.zeros((len(target), *rest)), const, f"{hint}_const")
        out = self.scatter_add(None, s.node, s.live, target, rest, hint)
        return self.add_const(out, const, f"{hint}_const")

    def full(self, s: _State, hint: str = "full") -> fx.Node:
        if s not in self.full_cache:
            self.full_cache[s] = self.materialize(s, range(s.channels), hint)
        return self.full_cache[s]
