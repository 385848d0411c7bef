"""The compact sub-network of a chain: pruned filters physically removed, plain PyTorch ops only.

:func:`compact` rewrites the model's traced fx graph (the same :class:`~nchains.analysis.ModelGraph`
the scored model is built from) into a smaller graph that computes exactly what the masked model
``chain.apply(model)`` computes. Per fx node it tracks a *channel state*:

- ``live``: the original channels (dim 1) that are physically present, in ascending order;
- ``const``: the batch-independent value of every other channel (``Tensor[C, *rest]``, zero at
  live positions). A removed filter's map is ``act(0)``; a BatchNorm, bias or padding downstream
  can turn it into a nonzero constant or a fixed spatial map, which is carried forward exactly
  and folded into consumers (a conv's or linear's bias, or a bias map when zero padding makes
  the contribution vary at the borders). So a layer without live inputs never runs.

Each conv keeps its own filter set. A residual add keeps the union of its operands' live
channels; an operand carrying a subset is added with ``index_add`` instead of forcing all
producers of the stream to share one channel set. Concats concatenate live channels only.
Grouped and depthwise convs keep their grouping (groups with no live filters or inputs are
dropped; uneven groups are padded with zero-weight channels).

Example:
    >>> chain = nchains.extract(model, images)
    >>> small = compact(chain, model)
    >>> torch.allclose(small(images), chain.apply(model)(images), atol=1e-5)
    True
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .analysis import ConvUnit, LinearUnit, ModelGraph, analyze, is_tensor
from .chain import Chain
from .scoring import _out_of_place, fold_bn64

__all__ = ["compact"]


@dataclass(eq=False)
class _State:
    """Channel state of one tensor of the original graph (see the module docstring)."""

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


def _fold64(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Conv + eval-mode BN as one float64 (weight, bias), bias zeros when absent."""
    w, b = fold_bn64(conv, bn)
    return w, torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b


def _slice_bn(bn: nn.BatchNorm2d, idx: Sequence[Optional[int]]) -> nn.BatchNorm2d:
    """BN restricted to channels ``idx`` (exact copies); None marks a neutral padding channel."""
    out = nn.BatchNorm2d(len(idx), eps=bn.eps, affine=bn.weight is not None).eval()
    out = out.to(bn.running_mean.dtype)
    real = [k for k, o in enumerate(idx) if o is not None]
    src = torch.as_tensor([o for o in idx if o is not None], dtype=torch.long)
    dst = torch.as_tensor(real, dtype=torch.long)
    with torch.no_grad():
        out.running_mean[dst] = bn.running_mean[src]
        out.running_var[dst] = bn.running_var[src]
        if bn.weight is not None:
            out.weight[dst] = bn.weight.detach()[src]
            out.bias[dst] = bn.bias.detach()[src]
    return out.requires_grad_(False)


def _unit_output(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], u: ConvUnit, score: torch.Tensor,
                 act: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``act(score * bn(conv(x)))`` for one batch-independent input ``x (Tensor[C, H, W])``,
    in the model's dtype as the masked model computes it: ``Tensor[C_out, H_out, W_out]``."""
    dtype = conv.weight.dtype
    with torch.no_grad():
        if _nonzero(x):
            z = F.conv2d(x.unsqueeze(0).to(dtype), conv.weight, conv.bias, u.stride, u.padding, u.dilation,
                         u.groups)
        else:  # zero input: only the bias, the same at every pixel
            z = (conv.bias if conv.bias is not None else conv.weight.new_zeros(u.out_channels)).view(1, -1, 1, 1)
        if bn is not None:
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        y = z * score.to(dtype).view(1, -1, 1, 1)
        y = act(y) if act is not None else y
    return y[0].expand(u.out_channels, *u.output_shape[2:]).clone()


class _Builder:
    """Builds the compact fx graph from a ModelGraph and per-layer scores and gates."""

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

    # ---- graph walk ----------------------------------------------------------------------

    def build(self) -> fx.GraphModule:
        graph = self.graph
        kinds = graph.node_kinds
        units = {u.first: u for u in [*graph.layers.values(), *graph.linears.values()]}
        inner = {n for u in units.values() for n in u.nodes[1:]}
        removed = [r for name, r in graph.regions.items() if self.gates.get(name, 1) == 0]
        removed_nodes = {n for r in removed for n in r.nodes}
        removed_out = {r.output: r for r in removed}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.input is not None:
                    raise ValueError("model must take one input tensor, got several placeholders")
                self.input = self.g.placeholder(node.name)
                self.batch = self.g.call_method("size", (self.input, 0))
                c, *rest = node.meta["tensor_meta"].shape[1:]
                self.env[node] = _State(self.input, list(range(c)), torch.zeros(c, *rest, dtype=self.dtype))
            elif node.op == "output":
                self.g.output(fx.node.map_arg(node.args[0], lambda n: self.value(n, full=True)))
            elif node in removed_out:
                self.env[node] = self.env[removed_out[node].input]
            elif node.op == "get_attr":
                self.env[node] = self.g.get_attr(self._copy_attr(node.target))
            elif node in removed_nodes or node in inner:
                continue
            elif node in units:
                unit = units[node]
                out = self.conv_unit(unit) if isinstance(unit, ConvUnit) else self.linear_unit(unit)
                self.env[unit.last] = out
            else:
                self.env[node] = self.op(node, kinds[node])
        gm = fx.GraphModule(self.root, self.g, class_name="CompactNet")
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        for name in [n for n, _ in gm.named_children() if n not in used]:
            delattr(gm, name)
        for name in [n for n, _ in gm.named_buffers(recurse=False) if n not in used]:
            delattr(gm, name)
        gm.recompile()
        return gm

    def _copy_attr(self, target: str) -> str:
        obj = self.gm
        for atom in target.split("."):
            obj = getattr(obj, atom)
        name = self._name(target)
        if isinstance(obj, torch.Tensor):
            self.root.register_buffer(name, obj.detach().clone())
        else:
            setattr(self.root, name, copy.deepcopy(obj))
        return name

    def value(self, node, full: bool = False):
        """The new-graph value of an original node (a fully materialised tensor for states)."""
        v = self.env[node]
        if isinstance(v, _State):
            return self.full(v) if full else v
        return v

    # ---- generic ops -----------------------------------------------------------------------

    def op(self, node: fx.Node, kind: str):
        states = [a for a in node.all_input_nodes if isinstance(self.env.get(a), _State)]
        if not states:  # shape queries and constants only
            return self.copy(node, full=True)
        if kind == "add" and len(states) == 2:
            return self.residual_add(node)
        if kind == "concat":
            return self.concat(node)
        if kind == "reshape":
            return self.reshape(node)
        if kind in ("act", "elementwise", "pool", "affine") and len(node.all_input_nodes) == 1 \
                and node.args and node.args[0] is states[0]:
            return self.channelwise(node, kind)
        return self.fallback(node)

    def copy(self, node: fx.Node, full: bool) -> fx.Node:
        new = self.g.node_copy(node, lambda n: self.value(n, full=full))
        if node.op == "call_module":
            new.target = self.module(_detached(self.gm.get_submodule(node.target)), node.target)
        _out_of_place(new)
        return new

    def fallback(self, node: fx.Node):
        """Any other op: runs on fully materialised inputs; its output is fully live."""
        new = self.copy(node, full=True)
        meta = node.meta.get("tensor_meta")
        if not is_tensor(node) or len(meta.shape) < 2:
            return new
        c, *rest = meta.shape[1:]
        return _State(new, list(range(c)), torch.zeros(c, *rest, dtype=self.dtype))

    def _evaluate(self, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
        """The original op on a concrete input ``x`` (its only tensor input)."""
        args = fx.node.map_arg(node.args, lambda n: x)
        kwargs = fx.node.map_arg(node.kwargs, lambda n: x)
        with torch.no_grad():
            if node.op == "call_module":
                module = _detached(self.gm.get_submodule(node.target))
                return module(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def channelwise(self, node: fx.Node, kind: str) -> _State:
        s: _State = self.env[node.args[0]]
        const = self._evaluate(node, s.const.unsqueeze(0).clone())[0]
        if const.dim() == 0 or const.shape[0] != s.channels:
            return self.fallback(node)
        const = const.clone()
        if s.live:
            const[torch.as_tensor(s.live)] = 0
        if s.node is None:
            return _State(None, [], const)
        if kind == "affine":  # a standalone BatchNorm: keep only the live channels
            bn = _slice_bn(self.gm.get_submodule(node.target), s.live)
            new = self.g.call_module(self.module(bn, node.target), (s.node,))
        else:
            new = self.g.node_copy(node, lambda n: s.node)
            if node.op == "call_module":
                new.target = self.module(_detached(self.gm.get_submodule(node.target)), node.target)
            _out_of_place(new)
        return _State(new, list(s.live), const)

    def residual_add(self, node: fx.Node) -> _State:
        a, b = (self.env[n] for n in node.args[:2]) if len(node.args) >= 2 else \
            (self.env[node.args[0]], self.env[node.kwargs["other"]])
        live = sorted(set(a.live) | set(b.live))
        const = a.const + b.const  # valid where both are dead; masked below where one is live
        hint = node.name
        if not live:
            return _State(None, [], const)
        if a.live == live and b.live == live:
            return _State(self.call(operator.add, a.node, b.node), live, const)
        # Channels live in one operand get the other operand's constant; dead ones the sum.
        idx = torch.as_tensor(live)
        base_const = torch.zeros_like(a.const)
        for s, other in ((a, b), (b, a)):
            if s.live:
                base_const[torch.as_tensor(s.live)] += other.const[torch.as_tensor(s.live)]
        out_const = const.clone()
        out_const[idx] = 0
        first, second = (a, b) if a.live == live else (b, a)
        rest = const.shape[1:]
        if first.live == live:
            out = first.node
        else:
            out = None if first.node is None else self.scatter_add(None, first.node, first.live, live, rest, hint)
        if second.node is not None:
            out = self.scatter_add(out, second.node, second.live, live, rest, hint)
        return _State(self.add_const(out, base_const[idx], f"{hint}_const"), live, out_const)

    def concat(self, node: fx.Node) -> _State:
        parts = list(node.args[0])
        if not all(isinstance(self.env.get(p), _State) for p in parts):
            return self.fallback(node)
        states = [self.env[p] for p in parts]
        live, nodes, offset = [], [], 0
        for s in states:
            live += [offset + c for c in s.live]
            if s.node is not None:
                nodes.append(s.node)
            offset += s.channels
        const = torch.cat([s.const for s in states])
        if not nodes:
            return _State(None, [], const)
        out = nodes[0] if len(nodes) == 1 else self.call(torch.cat, nodes, 1)
        return _State(out, live, const)

    def reshape(self, node: fx.Node) -> _State:
        s: _State = self.env[node.all_input_nodes[0]]
        shape = tuple(node.meta["tensor_meta"].shape)
        inner = math.prod(s.const.shape[1:])
        if len(shape) == 2 and shape[1] == s.channels * inner:  # flatten to features
            live = [c * inner + p for c in s.live for p in range(inner)]
            out = None if s.node is None else self.call(torch.flatten, s.node, 1)
            return _State(out, live, s.const.reshape(-1))
        if len(shape) >= 2 and shape[1] == s.channels and math.prod(shape[2:]) == inner:
            out = None if s.node is None else self.g.call_method(
                "reshape", (s.node, (-1, len(s.live), *shape[2:])))
            return _State(out, list(s.live), s.const.reshape(s.channels, *shape[2:]))
        return self.fallback(node)

    # ---- units -----------------------------------------------------------------------------

    def _unit_scores(self, name: str, size: int) -> torch.Tensor:
        s = self.scores.get(name)
        return torch.ones(size, dtype=torch.float64) if s is None else s.double()

    def conv_unit(self, u: ConvUnit) -> _State:
        s_in: _State = self.env[u.input]
        conv: nn.Conv2d = self.gm.get_submodule(u.conv)
        bn = self.gm.get_submodule(u.bn) if u.bn else None
        score = self._unit_scores(u.name, u.out_channels)
        act = copy.deepcopy(u.act_module) if u.act_module is not None else None
        # The exact (float32) unit output on the constant part of the input, as the masked
        # model computes it: the value of every channel that will not be computed here.
        y = _unit_output(conv, bn, u, score, act, s_in.const)
        cin_g, cout_g = u.in_channels // u.groups, u.out_channels // u.groups
        ins_of: Dict[int, List[int]] = {}
        outs_of: Dict[int, List[int]] = {}
        for c in s_in.live:
            ins_of.setdefault(c // cin_g, []).append(c)
        for o in torch.nonzero(score).flatten().tolist():
            outs_of.setdefault(o // cout_g, []).append(o)
        # (inputs, outputs) of each group that has live filters and live inputs
        groups = [(ins_of[j], outs_of[j]) for j in sorted(outs_of) if j in ins_of]
        live_out = [o for _, outs in groups for o in outs]
        const = y.clone()
        if live_out:
            const[torch.as_tensor(live_out)] = 0
        if not live_out:
            self.layers[u.name] = {"module": None, "out": [], "in": []}
            return _State(None, [], const)

        # Uneven groups are padded: extra inputs repeat a live channel with zero weights, extra
        # filters have zero weights and are dropped after the conv.
        n_in = max(len(i) for i, _ in groups)
        n_out = max(len(o) for _, o in groups)
        select: List[int] = []
        slots = torch.full((len(groups) * n_out,), -1, dtype=torch.long)  # original filter per slot
        w64, b64 = _fold64(conv, bn)
        raw_w = conv.weight.detach()
        source = raw_w if self.keep_scores else (w64 * score.view(-1, 1, 1, 1)).to(raw_w.dtype)
        weight = torch.zeros(len(slots), n_in, *u.kernel_size, dtype=raw_w.dtype)
        for j, (ins, outs) in enumerate(groups):
            pos = _positions(s_in.live, ins)
            select += pos + [pos[0]] * (n_in - len(ins))
            o = torch.as_tensor(outs)
            slots[j * n_out: j * n_out + len(outs)] = o
            weight[j * n_out: j * n_out + len(outs), : len(ins)] = source[o][:, torch.as_tensor(ins) % cin_g]
        x = s_in.node
        if select != list(range(len(s_in.live))):
            x = self.call(torch.index_select, x, 1, self.buffer(torch.as_tensor(select), f"{u.name}_in"))
        real = slots >= 0
        o_real = slots[real]
        bias = torch.zeros(len(slots), dtype=torch.float64)
        bias[real] = (b64 * score)[o_real]
        scale = torch.ones(len(slots), dtype=torch.float64)
        scale[real] = score[o_real]
        # Contribution of the constant input channels (exact, including zero-padding borders).
        corr = None
        if _nonzero(s_in.const):
            ref_w = raw_w.double() if self.keep_scores else w64 * score.view(-1, 1, 1, 1)
            maps = F.conv2d(s_in.const.unsqueeze(0).double(), ref_w, None, u.stride, u.padding, u.dilation,
                            u.groups)[0]
            corr = torch.zeros(len(slots), *maps.shape[1:], dtype=torch.float64)
            corr[real] = maps[o_real]
        keep_bias = self.keep_scores and conv.bias is not None
        if corr is not None and not self.keep_scores and bool((corr == corr[:, :1, :1]).all()):
            bias += corr[:, 0, 0]
            corr = None
        new = nn.Conv2d(n_in * len(groups), len(slots), u.kernel_size, u.stride, u.padding, u.dilation,
                        groups=len(groups), bias=keep_bias or not self.keep_scores)
        new = new.to(raw_w.dtype).eval().requires_grad_(False)
        with torch.no_grad():
            new.weight.copy_(weight)
            if keep_bias:
                new.bias.zero_()
                new.bias[real] = conv.bias.detach()[o_real]
            elif new.bias is not None:
                new.bias.copy_(bias.to(raw_w.dtype))
        target = self.module(new, u.conv)
        out = self.g.call_module(target, (x,))
        if corr is not None:
            out = self.add_const(out, corr, f"{u.name}_correction")
        if self.keep_scores:
            if bn is not None:
                bn_new = _slice_bn(bn, [o if o >= 0 else None for o in slots.tolist()])
                out = self.g.call_module(self.module(bn_new, u.bn), (out,))
            out = self.call(operator.mul, out, self.buffer(scale.to(raw_w.dtype).view(1, -1, 1, 1),
                                                           f"{u.name}_score"))
        if act is not None:
            out = self.g.call_module(self.module(act, f"{u.name}_act"), (out,))
        if not bool(real.all()):
            out = self.call(torch.index_select, out, 1, self.buffer(torch.nonzero(real).flatten(), f"{u.name}_out"))
        self.layers[u.name] = {"module": target, "out": live_out,
                               "in": [c for ins, _ in groups for c in ins]}
        return _State(out, live_out, const)

    def linear_unit(self, u: LinearUnit) -> _State:
        s_in = self.env[u.input]
        lin: nn.Linear = self.gm.get_submodule(u.first.target)
        scored = u.name in self.scores
        score = self._unit_scores(u.name, u.out_features)
        act = copy.deepcopy(u.act_module) if u.act_module is not None else None
        w = lin.weight.detach()
        if not isinstance(s_in, _State) or s_in.const.dim() != 1:
            # A Linear over the last dim of a higher-rank tensor: it runs whole.
            x = s_in if not isinstance(s_in, _State) else self.full(s_in)
            s_in = _State(x, list(range(u.in_features)), torch.zeros(u.in_features, dtype=w.dtype))
            if len(u.input_shape) != 2:
                out = self.g.call_module(self.module(_detached(lin), u.first.target), (x,))
                if scored:
                    out = self.call(operator.mul, out, self.buffer(score.to(w.dtype), f"{u.name}_score"))
                if act is not None:
                    out = self.g.call_module(self.module(act, f"{u.name}_act"), (out,))
                self.layers[u.name] = {"module": None, "out": list(range(u.out_features)), "in": []}
                c, *rest = u.output_shape[1:]
                return _State(out, list(range(c)), torch.zeros(c, *rest, dtype=w.dtype))
        with torch.no_grad():
            y = F.linear(s_in.const.unsqueeze(0).to(w.dtype), w, lin.bias) * score.to(w.dtype)
            y = (act(y) if act is not None else y)[0]
        live_out = [int(o) for o in torch.nonzero(score).flatten()] if s_in.live else []
        const = y.clone()
        if live_out:
            const[torch.as_tensor(live_out)] = 0
        if not live_out:
            self.layers[u.name] = {"module": None, "out": [], "in": []}
            return _State(None, [], const)
        o_idx, i_idx = torch.as_tensor(live_out), torch.as_tensor(s_in.live)
        b64 = torch.zeros(u.out_features, dtype=torch.float64) if lin.bias is None else lin.bias.detach().double()
        dead = torch.ones(u.in_features, dtype=torch.bool)
        dead[i_idx] = False
        extra = w.double()[:, dead] @ s_in.const.double()[dead] if _nonzero(s_in.const) else None
        keep = self.keep_scores or not scored  # exact copies; scores (if any) as a multiply
        new = nn.Linear(len(s_in.live), len(live_out), bias=lin.bias is not None or extra is not None)
        new = new.to(w.dtype).eval().requires_grad_(False)
        with torch.no_grad():
            if keep:
                new.weight.copy_(w[o_idx][:, i_idx])
                if new.bias is not None:
                    new.bias.copy_(lin.bias.detach()[o_idx] if extra is None else (b64 + extra)[o_idx].to(w.dtype))
            else:
                new.weight.copy_((w.double()[o_idx][:, i_idx] * score[o_idx, None]).to(w.dtype))
                if new.bias is not None:
                    new.bias.copy_(((b64 + (0 if extra is None else extra)) * score)[o_idx].to(w.dtype))
        target = self.module(new, u.first.target)
        out = self.g.call_module(target, (s_in.node,))
        if scored and keep:
            out = self.call(operator.mul, out, self.buffer(score[o_idx].to(w.dtype), f"{u.name}_score"))
        if act is not None:
            out = self.g.call_module(self.module(act, f"{u.name}_act"), (out,))
        self.layers[u.name] = {"module": target, "out": live_out, "in": list(s_in.live)}
        return _State(out, live_out, const)


def _detached(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).eval().requires_grad_(False)
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "inplace"):
            m.inplace = False
    return module


def compact(chain: Chain, model: nn.Module, *, keep_scores: bool = False,
            scatter: str = "index_add") -> fx.GraphModule:
    """The chain as a small standalone model made of plain PyTorch ops.

    Pruned filters are removed together with the matching input channels of every consumer,
    removed regions are the identity, layers with no live filter do not run (their constant
    output is folded downstream), eval-mode BatchNorm is folded into the convs and the chain's
    scores into the weights. Computes what ``chain.apply(model)`` computes (up to float
    rounding).

    Args:
        chain (Chain): a chain extracted from ``model``.
        model (nn.Module): the original model (weights must match ``chain.model_hash``); not
            modified, except that it is put in eval mode.
        keep_scores (bool): keep BatchNorm and the scores as explicit per-channel ops, so that
            every retained filter's weights (and BN parameters) are bit-for-bit copies of the
            original's.
        scatter (str): how a tensor holding a subset of a wider channel set (a residual branch
            writing part of its stream) is added into it; both are exact. ``"index_add"``
            (fastest in eager PyTorch and TorchScript) or ``"gather"`` (zero-pad one channel,
            ``index_select``, add: a Gather in ONNX, fastest in onnxruntime).

    Returns:
        torch.fx.GraphModule in eval mode mapping ``Tensor[N, *chain.input_shape]`` to the
        logits ``Tensor[N, classes]``, for any batch size N. Its ``nchains_layers``
        attribute maps each analysed layer to ``{"module": name or None, "out": original
        output channels computed, "in": original input channels read}``.

    Raises:
        TypeError: on wrong argument types.
        ValueError: when ``model`` is not the chain's model or is not supported.
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be an nchains.Chain, got {type(chain).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(keep_scores, bool):
        raise TypeError(f"keep_scores must be True or False, got {keep_scores!r}")
    if scatter not in ("index_add", "gather"):
        raise ValueError(f"scatter must be 'index_add' or 'gather', got {scatter!r}")
    if not chain.input_shape:
        raise ValueError("chain has no input_shape; it cannot be compacted")
    chain.check_model(model)
    model.eval()
    dtype = next(model.parameters()).dtype
    graph = analyze(model, torch.zeros(1, *chain.input_shape, dtype=dtype))
    unknown = sorted(set(chain.layer_sizes) - set(graph.layers) - set(graph.linears))
    if unknown:
        raise ValueError(f"chain names layers the model does not have: {unknown[:5]}")
    for name, size in chain.layer_sizes.items():
        unit = graph.layers.get(name) or graph.linears.get(name)
        width = unit.out_channels if isinstance(unit, ConvUnit) else unit.out_features
        if width != size:
            raise ValueError(f"chain layer {name!r} has {size} filters but the model's has {width}")
    gates = {name: int(g) for name, g in chain.gates.items()}
    builder = _Builder(graph, chain.full_scores(), gates, keep_scores, dtype, scatter)
    gm = builder.build()
    gm.nchains_layers = builder.layers
    return gm.eval().requires_grad_(False)
