"""Compacting the joins of a CNN: residual adds (union of the operands' live channels, a
subset added with ``index_add``/``gather``), channel concats (live channels only) and reshapes
(flatten to features), on the channel states of :mod:`nchains.compact.emit`.

:class:`_JoinBuilder` adds these handlers to the unit builder; the graph walk
(:class:`nchains.compact.walk._Builder`) dispatches to them and supplies ``fallback``.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import List, Optional

import torch
from torch import fx, nn

from nchains.compact.emit import _nonzero, _positions, _State
from nchains.compact.units import _UnitBuilder


class _JoinBuilder(_UnitBuilder):
    """Residual adds, concats and reshapes of the compact graph (``fallback``: the walk's)."""

    def residual_add(self, node: fx.Node) -> _State:
        operands = list(node.args[:2]) if len(node.args) >= 2 else [node.args[0], node.kwargs["other"]]
        a, b = (self.env[n] for n in operands)
        live = sorted(set(a.live) | set(b.live))
        const = a.const + b.const  # valid where both are dead; masked below where one is live
        hint = node.name
        if not live:
            return _State(None, [], const)
        pad = self.padding(len(live))
        if (a.live, a.pad) != (live, pad) and (b.live, b.pad) != (live, pad):
            # at most one operand (widening rewrites its conv: the other must keep its layout)
            wide = self._widen_for_free(a, operands[0], live, pad)
            if wide is not None:
                a = wide
            else:
                b = self._widen_for_free(b, operands[1], live, pad) or b
        if a.live == live and b.live == live and a.pad == b.pad:
            return _State(self.call(operator.add, a.node, b.node), live, const, a.pad)
        # Channels live in one operand get the other operand's constant; dead ones the sum.
        idx = torch.as_tensor(live)
        base_const = torch.zeros_like(a.const)
        for s, other in ((a, b), (b, a)):
            if s.live:
                base_const[torch.as_tensor(s.live)] += other.const[torch.as_tensor(s.live)]
        out_const = const.clone()
        out_const[idx] = 0
        first, second = (a, b) if (a.live, a.pad) == (live, pad) else (b, a)
        rest = const.shape[1:]
        if (first.live, first.pad) == (live, pad):
            out = first.node
        else:
            out = None if first.node is None else self.scatter_add(None, first.node, first.live, live, rest, hint,
                                                                   first.pad, pad)
        if second.node is not None:
            out = self.scatter_add(out, second.node, second.live, live, rest, hint, second.pad, pad)
        out = self.add_const(out, self.pad_const(base_const[idx], pad), f"{hint}_const")
        return _State(out, live, out_const, pad)

    def _widen_for_free(self, s: _State, operand: fx.Node, live: List[int], pad: int) -> Optional[_State]:
        """``s`` laid out as the residual stream (channels ``live`` then ``pad`` zeros) by
        moving its conv's filters to the stream's positions, when that costs nothing: ``s`` is a
        plain conv output (no activation, correction or score op after it) of the stream's padded
        width, read by this add only, and zero wherever it writes no channel. The zero filters
        fill channels that were padding anyway, so the join needs no zeros tensor and one
        scatter fewer (``channel_multiple > 1`` only: unpadded convs keep exactly their filters)."""
        if self.multiple == 1 or s.node is None or s.node.op != "call_module" or s.node.users \
                or len(operand.users) != 1 or s.width != len(live) + pad:
            return None
        if sum(v is s for v in self.env.values()) != 1:  # another node (a removed region) shares it
            return None
        conv = self.root.get_submodule(s.node.target)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.out_channels != s.width:
            return None
        own = set(s.live)
        new_pos = torch.as_tensor([c for c in live if c not in own], dtype=torch.long)
        if len(new_pos) and _nonzero(s.const[new_pos]):
            return None
        rows = torch.as_tensor(_positions(live, s.live), dtype=torch.long)
        wide = copy.deepcopy(conv)
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[rows] = conv.weight[: len(s.live)]
            if wide.bias is not None:
                wide.bias.zero_()
                wide.bias[rows] = conv.bias[: len(s.live)]
        setattr(self.root, s.node.target, wide)
        self.taps.update({k: (n, list(live)) for k, (n, _) in self.taps.items() if n is s.node})
        return _State(s.node, list(live), s.const, pad)

    def concat(self, node: fx.Node) -> _State:
        parts = list(node.args[0])
        if not all(isinstance(self.env.get(p), _State) for p in parts):
            return self.fallback(node)
        # live channels only (padding dropped), the concatenation padded again
        states = [self.env[p] for p in parts]
        if len([s for s in states if s.node is not None]) > 1:
            states = [self.repad(s, 0) for s in states]
        live, nodes, offset, pad = [], [], 0, 0
        for s in states:
            live += [offset + c for c in s.live]
            if s.node is not None:
                nodes.append(s.node)
                pad = s.pad
            offset += s.channels
        const = torch.cat([s.const for s in states])
        if not nodes:
            return _State(None, [], const)
        out = nodes[0] if len(nodes) == 1 else self.call(torch.cat, nodes, 1)
        return self.repad(_State(out, live, const, pad), self.padding(len(live)))

    def reshape(self, node: fx.Node) -> _State:
        s: _State = self.env[node.all_input_nodes[0]]
        shape = tuple(node.meta["tensor_meta"].shape)
        inner = math.prod(s.const.shape[1:])
        if len(shape) == 2 and shape[1] == s.channels * inner:  # flatten to features
            live = [c * inner + p for c in s.live for p in range(inner)]
            out = None if s.node is None else self.call(torch.flatten, s.node, 1)
            return _State(out, live, s.const.reshape(-1), s.pad * inner)
        if len(shape) >= 2 and shape[1] == s.channels and math.prod(shape[2:]) == inner:
            out = None if s.node is None else self.g.call_method(
                "reshape", (s.node, (-1, s.width, *shape[2:])))
            return _State(out, list(s.live), s.const.reshape(s.channels, *shape[2:]), s.pad)
        return self.fallback(node)
