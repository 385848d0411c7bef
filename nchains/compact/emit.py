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

from nchains.graph.analysis import ModelGraph


@dataclass(eq=False)
class _State:
    """Channel state of one tensor of the original graph (see :mod:`nchains.compact`)."""

    node: Optional[fx.Node]
    live: List[int]
    const: torch.Tensor
    pad: int = 0  # exactly-zero channels after the live ones in ``node`` (``channel_multiple``)

    @property
    def channels(self) -> int:
        return self.const.shape[0]

    @property
    def width(self) -> int:
        """Channels physically in ``node``: the live ones, then ``pad`` zero channels."""
        return len(self.live) + self.pad


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
                 keep_scores: bool, dtype: torch.dtype, scatter: str, channel_multiple: int = 1,
                 max_pool: str = "native"):
        self.graph, self.gm = graph, graph.graph_module
        self.scatter, self.multiple, self.max_pool = scatter, channel_multiple, max_pool
        self.scores, self.gates, self.keep_scores, self.dtype = scores, gates, keep_scores, dtype
        self.g = fx.Graph()
        self.root = nn.Module()
        self.env: Dict[fx.Node, Any] = {}
        self.full_cache: Dict[_State, fx.Node] = {}
        self.names: set = set()
        self.layers: Dict[str, Dict[str, Any]] = {}
        # unit -> (node holding its computed channels first, those channels): self-check taps
        self.taps: Dict[str, Any] = {}
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

    def separable_max_pool(self, node: fx.Node, spatial: Sequence[int], kernel: Sequence[int],
                           stride: Sequence[int], padding: Sequence[int]) -> fx.Node:
        """2-d max pooling of ``node`` (``[N, C, *spatial]``, dilation 1, floor mode) as strided
        slices and elementwise maxima, first along the height (slices of whole contiguous rows,
        which vectorise; 1.1-1.9x faster than width first), then along the width on the smaller
        tensor: exactly the pooled values (max is exact and associative; padding is -inf, as in
        ``max_pool2d``), without the int64 index tensor that ``max_pool2d`` on CPU computes and
        writes for every output (4-10x faster on CPU, ``tools/bench_export.py``). When ``node`` is a monotone
        activation (ReLU, ReLU6, Hardtanh, LeakyReLU with a non-negative slope), it is applied
        after the pooling instead, on the smaller tensor: max commutes with monotone functions,
        exactly in floating point too."""
        act = self._monotone_act(node)
        if act is not None:
            node = node.args[0]
        if any(padding):
            node = self.call(F.pad, node, (padding[1], padding[1], padding[0], padding[0]), "constant",
                             float("-inf"))
        for dim in (2, 3):
            k, st = kernel[dim - 2], stride[dim - 2]
            size = spatial[dim - 2] + 2 * padding[dim - 2]
            out = (size - k) // st + 1
            if k == 1 and st == 1:
                continue
            parts = []
            for j in range(k):
                index = (slice(None),) * dim + (slice(j, j + st * (out - 1) + 1, st if st > 1 else None),)
                parts.append(self.call(operator.getitem, node, index))
            node = parts[0]
            for part in parts[1:]:
                node = self.call(torch.maximum, node, part)
        return node if act is None else self.g.call_module(act, (node,))

    def _monotone_act(self, node: fx.Node) -> Optional[str]:
        """The target of ``node`` when it calls a monotone non-decreasing activation module."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        m = self.root.get_submodule(node.target)
        monotone = isinstance(m, (nn.ReLU, nn.ReLU6)) or (isinstance(m, nn.Hardtanh) and m.min_val <= m.max_val) \
            or (isinstance(m, nn.LeakyReLU) and m.negative_slope >= 0)
        return node.target if monotone else None

    def padding(self, n: int) -> int:
        """Zero channels that bring ``n`` live channels to a multiple of ``channel_multiple``."""
        return -n % self.multiple

    def pad_const(self, const: torch.Tensor, pad: int) -> torch.Tensor:
        """``const`` (one value per live channel) followed by ``pad`` zero channels."""
        return torch.cat([const, const.new_zeros(pad, *const.shape[1:])]) if pad else const

    def repad(self, s: _State, pad: int) -> _State:
        """``s`` with ``pad`` zero channels after its live ones (channel slice or zero pad)."""
        if s.node is None or s.pad == pad:
            return s
        if pad < s.pad:
            node = self.call(torch.narrow, s.node, 1, 0, len(s.live) + pad)
        else:
            node = self.call(F.pad, s.node, (0, 0) * (s.const.dim() - 1) + (0, pad - s.pad))
        return _State(node, list(s.live), s.const, pad)

    def expand(self, node: fx.Node, live: List[int], pad: int, target: List[int], tpad: int, rank: int,
               hint: str) -> fx.Node:
        """``node`` (channels ``live`` then ``pad`` zeros) widened to channels ``target`` then
        ``tpad`` zeros: ``index_select`` (a Gather in ONNX) of a zero channel where ``node`` has
        none, after padding one when it has no zero channel."""
        if live == target and pad == tpad:
            return node
        if not pad:
            node = self.call(F.pad, node, (0, 0) * (rank - 2) + (0, 1))
        where = {c: i for i, c in enumerate(live)}
        gather = torch.as_tensor([where.get(c, len(live)) for c in target] + [len(live)] * tpad, dtype=torch.long)
        return self.call(torch.index_select, node, 1, self.buffer(gather, f"{hint}_gather"))

    def scatter_add(self, base: Optional[fx.Node], node: fx.Node, live: List[int], target: List[int],
                    rest: Sequence[int], hint: str, pad: int = 0, tpad: int = 0) -> fx.Node:
        """``base + node`` where ``node`` holds the subset ``live`` (then ``pad`` zero channels)
        of the channels ``target`` (then ``tpad`` zero channels) of ``base`` (zeros when ``base``
        is None)."""
        if self.scatter == "gather":
            wide = self.expand(node, live, pad, target, tpad, 2 + len(rest), hint)
            return wide if base is None else self.call(operator.add, base, wide)
        if base is None:
            base = self.zeros((len(target) + tpad, *rest))
        # node's zero channels are added (exactly) into the last channel of base
        index = _positions(target, live) + [len(target) + tpad - 1] * pad
        idx = self.buffer(torch.as_tensor(index, dtype=torch.long), f"{hint}_index")
        return self.call(torch.index_add, base, 1, idx, node)

    def materialize(self, s: _State, target: Sequence[int], hint: str, tpad: int = 0) -> fx.Node:
        """A tensor holding channels ``target`` (a sorted superset of ``s.live``) then ``tpad``
        zero channels."""
        target = list(target)
        if s.node is not None and s.live == target and s.pad == tpad:
            return s.node
        rest = tuple(s.const.shape[1:])
        const = self.pad_const(s.const[torch.as_tensor(target, dtype=torch.long)], tpad)
        if s.node is None:
            return self.add_const(self.zeros((len(target) + tpad, *rest)), const, f"{hint}_const")
        out = self.scatter_add(None, s.node, s.live, target, rest, hint, s.pad, tpad)
        return self.add_const(out, const, f"{hint}_const")

    def full(self, s: _State, hint: str = "full") -> fx.Node:
        if s not in self.full_cache:
            self.full_cache[s] = self.materialize(s, range(s.channels), hint)
        return self.full_cache[s]
