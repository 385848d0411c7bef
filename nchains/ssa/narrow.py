"""The narrowed relevance step of SSA: each chosen upper neuron computes only its own channel
of the upper unit (used by :func:`nchains.ssa.step.step_relevance` through ``step.narrow``).

Narrowed steps (:class:`NarrowTail`): upper neuron ``n`` needs only channel ``n`` of ``U``, so
where ``U``'s own ops after its input (the end of the step graph) are exactly the analysed
unit -- one call of its conv (any groups, stride, dilation, zero padding and pre-pad of
:class:`~nchains.graph.units.ConvUnit`, with the weight and bias the conv computes with) or of
an exact ``nn.Linear`` with a 2-d output, then at most an exact eval-mode ``nn.BatchNorm2d``
and the unit's elementwise activation, each reading only the one before -- the step computes
for each chosen neuron its own channel only, forward and backward: the segment up to ``U``'s
input (the *head*) runs once on the N images with the producers' outputs as leaves; ``U``'s
selected filters (rows), BN statistics and activation run once on that input; one backward to
their pre-activations gives every neuron's seed (channel ``j`` reaches response ``j`` only);
the transpose of the conv is applied per neuron with its own filter, as a matmul of the filter
taps with the seeds' shifted windows, and the producers' spatial means are formed three ways:
when ``U`` reads a producer directly, from sums of the seeds (no map is made); when the head
is a tree of two-operand residual adds and ReLUs over the producers (a ResNet stream: each
producer's gradient is the input's times the ReLU masks on its way; same shapes, a groups = 1
conv), per image one matmul of the masks with the windows (no Tensor[s, N, C, H, W] is made);
else the head's VJP of every neuron as one batched backward (``is_grads_batched``) on the
transposed seeds. Anything else -- another op or module in ``U``'s chain, a
``BatchNorm2d`` subclass, a unit reading the images, ``narrow=False``, and, when the step runs,
a module of the step (the unit's or the head's) in training mode (a BN's batch statistics
couple the full computation's stacked copies) or a forward or backward hook on one of its modules
or on every module (the narrowed ops call no module, so they would skip it) -- takes the full
computation above (every stacked copy computes every channel of ``U``). Both give the same
relevance up to rounding (tests/ssa/test_narrow_step.py, in float64 to 1e-9).

Measured on eight steps of the shipped model (50 images, 10-24 neurons each, median of 3,
interleaved; :file:`tools/bench_ssa.py`'s model; another job was using one of the 2 cores):
on 1 thread the eight took 0.105 s narrowed and 1.35 s full (12.8x; 9-25x per conv step, 1.9x
on the classifier), 0.20 s with the batched backward in place of the masks, and 1.39 s with
``U``'s conv as one grouped conv over the stacked copies (``groups = s``, the selected filters,
autograd through it), the first design tried: oneDNN's grouped conv with one output channel
per group was no faster than the full conv here, so it was dropped. The relevance of a whole
run (10 classes x 20 images) took 0.4 s instead of 4.2 s. (The head run on stacked copies
with one backward, as in the full computation, was 1.5x slower than its batched backward on a
whole run.) On 2 threads with the other job running every variant was slower -- the eight
steps 1.6 s narrowed, 2.4 s full: each parallel op waits for its descheduled thread, and the
narrowed steps' many small ops suffer most.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as _module_lib

from nchains.graph.analysis import ModelGraph
from nchains.graph.classify import _act_kind
from nchains.graph.units import ConvUnit
from nchains.ssa.step import _reduce, response_of

__all__ = ["NarrowTail", "narrow_tail"]

#: a module's (and, with ``_global``, every module's) forward and backward hooks
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def narrow_tail(graph: ModelGraph, unit, last: fx.Node):
    """``(input node, unit, bn)`` when ``unit``'s nodes in the tapped copy (its
    output ``last`` and, walking up, its BN and conv or linear) are the analysed unit's: one
    call of the unit's exact ``nn.Linear`` (2-d output) or conv, then at most an exact
    ``nn.BatchNorm2d`` and the unit's activation, each reading only the one before; else None."""
    chain = [last]
    for _ in unit.nodes[1:]:
        up = chain[0].args[0] if chain[0].args else None
        if not isinstance(up, fx.Node):
            return None
        chain.insert(0, up)
    first, mods = chain[0], graph.graph_module
    if (any(len(node.all_input_nodes) != 1 for node in chain) or first.op != "call_module"
            or first.target != unit.first.target or len(first.args) != 1 or first.kwargs):
        return None
    if isinstance(unit, ConvUnit):
        bn = mods.get_submodule(unit.bn) if unit.bn else None
        if bn is not None and (chain[1].op != "call_module" or chain[1].target != unit.bn
                               or type(bn) is not nn.BatchNorm2d):
            return None
        return first.args[0], unit, bn
    if type(mods.get_submodule(first.target)) is not nn.Linear or len(unit.output_shape) != 2:
        return None
    return first.args[0], unit, None


class NarrowTail:
    """An upper unit's own ops for one chosen channel (feature) per upper neuron, and the
    relevance through them (:meth:`relevance`; the rule and the method are in the module
    docstring).

    ``head`` is the step's segment up to the unit's input (``forward(images, *lower_outputs)``);
    ``direct`` is the index of the producer that *is* that input (no op in between), else None;
    :attr:`weight`/:attr:`bias` are what the unit's conv or linear computes with, read from the
    modules at each use (a replaced parameter or a parametrization's changed
    original is seen, as the full computation sees it; the effective weight of a Conv2d subclass
    is the one read at analysis, :meth:`~nchains.graph.units.ConvUnit.params`), ``bn`` its BN;
    ``modules`` the modules the unit and the head call (with their submodules), whose mode and
    hooks :attr:`usable` reads.
    """

    def __init__(self, head: fx.GraphModule, lowers: int, direct: Optional[int], unit, bn: Optional[nn.BatchNorm2d]):
        self.head, self.direct, self.bn = head, direct, bn
        self.act = unit.act_module
        self.masks = None if direct is not None else _relu_paths(head, lowers)
        self.mask_head = None if self.masks is None else _with_outputs(head, self.masks[1])
        self.conv = None if not isinstance(unit, ConvUnit) else (
            unit.stride, unit.padding, unit.dilation, unit.groups, unit.pre_pad)
        self.unit, self.owner = unit, unit.first.graph.owning_module
        called = [self.owner.get_submodule(node.target) for node in unit.nodes if node.op == "call_module"]
        called += [head.get_submodule(node.target) for node in head.graph.nodes if node.op == "call_module"]
        self.modules = tuple({id(m): m for top in called for m in top.modules()}.values())

    @property
    def usable(self) -> bool:
        """False while the step's modules (``modules``) may not compute what the narrowed ops
        assume: one in training mode (a BN's batch statistics, dropout, a spectral norm's power
        iteration), or a forward or backward hook on one of them or on every module
        (``register_module_forward_hook``)."""
        if any(getattr(_module_lib, f"_global{h}", None) for h in _HOOKS):
            return False
        return not any(m.training or any(getattr(m, h, None) for h in _HOOKS) for m in self.modules)

    def relevance(self, images: torch.Tensor, lower_outputs: Sequence[torch.Tensor], neurons: torch.Tensor,
                  response: str) -> Tuple[torch.Tensor, ...]:
        """``omega`` per producer, Tensor[s, N, K] each (as :func:`step_relevance`)."""
        s = len(neurons)
        if self.direct is not None:
            x = lower_outputs[self.direct]
            omega = self._input_grad(x, neurons, response, reduce=True)
            return tuple(omega if j == self.direct else v.new_zeros(s, len(v), v.shape[1])
                         for j, v in enumerate(lower_outputs))
        if self.masks is not None and self.conv is not None:
            masked = self._masked(images, lower_outputs, neurons, response)
            if masked is not None:
                return masked
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(True) for v in lower_outputs]
            x = self.head(images, *leaves)
            grads = torch.autograd.grad(x, leaves, grad_outputs=self._input_grad(x, neurons, response),
                                        allow_unused=True, is_grads_batched=True)
        return tuple(v.new_zeros(s, len(v), v.shape[1]) if g is None else _reduce(g) for v, g in zip(leaves, grads))

    def _params(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The unit's weight and bias as its modules hold them now, detached."""
        if isinstance(self.unit, ConvUnit):
            weight, bias = self.unit.params(self.owner)
        else:
            lin = self.owner.get_submodule(self.unit.first.target)
            weight, bias = lin.weight, lin.bias
        return weight.detach(), None if bias is None else bias.detach()

    @property
    def weight(self) -> torch.Tensor:
        """The unit's conv or linear weight, as its module holds it now (detached)."""
        return self._params()[0]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The unit's bias as its module holds it now (detached), or None."""
        return self._params()[1]

    def _input_grad(self, x: torch.Tensor, neurons: torch.Tensor, response: str, reduce: bool = False):
        """``d response_j / d x`` for every neuron ``j``: Tensor[s, N, *x.shape[1:]] (``reduce``:
        averaged over space, Tensor[s, N, C])."""
        w = self.weight[neurons]
        seed = self._seed(x, w, neurons, response)
        if self.conv is None:
            return seed.t()[:, :, None] * w[:, None, :]
        return self._conv_transpose(seed, w, x.shape, neurons, reduce)

    def _seed(self, x: torch.Tensor, w: torch.Tensor, neurons: torch.Tensor, response: str) -> torch.Tensor:
        """``d response_j / d z_j`` (``z``: the selected channels before BN and activation),
        Tensor[N, s, ...], by one backward: channel ``j`` reaches response ``j`` only."""
        s, n = len(neurons), len(x)
        with torch.enable_grad():
            z = self._pre_act(x.detach(), w, neurons).requires_grad_(True)
            out = self._post(z, neurons)
            resp = response_of(out.transpose(0, 1).reshape(s * n, 1, *out.shape[2:]), torch.zeros_like(neurons),
                               response)
            return torch.autograd.grad(resp.sum(), z)[0]

    def _masked(self, images: torch.Tensor, lower_outputs: Sequence[torch.Tensor], neurons: torch.Tensor,
                response: str) -> Optional[Tuple[torch.Tensor, ...]]:
        """The relevance through a head of residual adds and ReLUs only (``masks``), each
        producer's gradient being the input's times the ReLU masks on its way: per image one
        matmul of the masks with the seeds' windows (Tensor[C, H*W] @ Tensor[H*W, s*kh*kw]),
        never a Tensor[s, N, C, H, W]. None where that does not apply (grouped conv, or a
        broadcasting add seen in the shapes)."""
        plan, _ = self.masks
        with torch.no_grad():
            x, *relus = self.mask_head(images, *lower_outputs)
        if self.conv[3] != 1 or any(t.shape != x.shape for t in (*relus, *(lower_outputs[k] for k in plan))):
            return None
        s, (n, c, height, width) = len(neurons), x.shape
        w = self.weight[neurons]
        kk = w.shape[2] * w.shape[3]
        seed = self._seed(x, w, neurons, response).permute(0, 2, 3, 1)  # [N, H', W', s]
        windows = torch.stack(self._windows(seed, w.shape[2:], x.shape), -1).view(n, height * width, s * kk)
        taps = w.flip(2, 3).reshape(s, c, kk)
        done: Dict[Tuple[int, ...], torch.Tensor] = {}
        out = []
        for k, v in enumerate(lower_outputs):
            path = plan.get(k)
            if path is None:
                out.append(v.new_zeros(s, n, v.shape[1]))
                continue
            if path not in done:
                if path:
                    mask = torch.ones_like(x, dtype=torch.bool)
                    for r in path:
                        mask &= relus[r] > 0
                    per = torch.bmm(mask.to(x.dtype).view(n, c, height * width), windows).view(n, c, s, kk)
                    done[path] = torch.einsum("jco,icjo->jic", taps, per) / (height * width)
                else:
                    per = windows.sum(1).view(n, s, kk)
                    done[path] = torch.einsum("jco,ijo->jic", taps, per) / (height * width)
            out.append(done[path])
        return tuple(out)

    def _group(self, neurons: torch.Tensor) -> torch.Tensor:
        return neurons // (self.unit.out_channels // self.conv[3])

    def _pre_act(self, x: torch.Tensor, w: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """The selected channels before BN and activation, Tensor[N, s, ...] (detached)."""
        bias = self.bias
        b = None if bias is None else bias[neurons]
        if self.conv is None:
            return F.linear(x, w, b)
        stride, padding, dilation, groups, pre_pad = self.conv
        if groups > 1:  # neuron j reads the input channels of its own group
            x = x.reshape(len(x), groups, -1, *x.shape[2:])[:, self._group(neurons)].flatten(1, 2)
            groups = len(neurons)
        return F.conv2d(F.pad(x, pre_pad) if any(pre_pad) else x, w, b, stride, padding, dilation, groups)

    def _post(self, z: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            bn = self.bn
            z = F.batch_norm(z, bn.running_mean[neurons], bn.running_var[neurons],
                             None if bn.weight is None else bn.weight.detach()[neurons],
                             None if bn.bias is None else bn.bias.detach()[neurons], False, 0.0, bn.eps)
        return z if self.act is None else self.act(z)

    def _conv_transpose(self, seed: torch.Tensor, w: torch.Tensor, in_shape, neurons: torch.Tensor,
                        reduce: bool) -> torch.Tensor:
        """Seeds Tensor[N, s, H', W'] -> Tensor[s, N, C_in, H, W]: neuron j's seed through the
        transpose of its own filter ``w[j]`` (``d conv / d x``), as one batched matmul of the
        filter taps with the seeds that reach x through each tap (the seeds zero-stuffed for a
        strided conv, padded, and shifted by the tap). With ``reduce``: Tensor[s, N, C_in], the
        spatial means, from the sums of the seeds each tap spreads over x (no map of x made)."""
        stride, padding, dilation, groups, pre_pad = self.conv
        n, s, ho, wo = seed.shape
        kh, kw = w.shape[2:]
        height, width = in_shape[2], in_shape[3]
        top, left = pre_pad[2] + padding[0], pre_pad[0] + padding[1]
        g = seed.transpose(0, 1).reshape(s * n, ho, wo)
        if reduce:
            sums = []
            for a in range(kh):
                r0, r1 = _reached(a, top, stride[0], dilation[0], height, ho)
                rows = g[:, r0:r1].sum(1)
                for b in range(kw):
                    c0, c1 = _reached(b, left, stride[1], dilation[1], width, wo)
                    sums.append(rows[:, c0:c1].sum(1))
            taps = w.reshape(s, 1, w.shape[1], kh * kw)
            gx = (taps @ torch.stack(sums, 1).view(s, n, kh * kw, 1))[..., 0] / (height * width)
        else:
            windows = torch.stack(self._windows(g, w.shape[2:], in_shape), 1).view(s, n, kh * kw, height * width)
            taps = w.flip(2, 3).reshape(s, 1, w.shape[1], kh * kw)
            gx = (taps @ windows).view(s, n, -1, height, width)
        if groups == 1:
            return gx
        full = gx.new_zeros(s, n, groups, *gx.shape[2:])
        full[torch.arange(s, device=gx.device), :, self._group(neurons)] = gx
        return full.flatten(2, 3)

    def _windows(self, g: torch.Tensor, kernel, in_shape) -> List[torch.Tensor]:
        """Seeds ``g`` Tensor[B, H', W', *rest] -> kh * kw Tensors[B, H, W, *rest]: window
        ``a * kw + b`` at x's position p holds the seed that reaches p through the filter's tap
        ``(kh-1-a, kw-1-b)`` (the seeds zero-stuffed for a strided conv, padded by
        ``(k - 1) * dilation`` before and up to the padded input size after, then shifted).
        (F.unfold's im2col was 10-30x slower than these slices here.)"""
        stride, padding, (dh, dw), _, pre_pad = self.conv
        (kh, kw), (height, width) = kernel, in_shape[2:]
        top, left = pre_pad[2] + padding[0], pre_pad[0] + padding[1]
        hp, wp = height + pre_pad[2] + pre_pad[3] + 2 * padding[0], width + pre_pad[0] + pre_pad[1] + 2 * padding[1]
        if tuple(stride) != (1, 1):
            stuffed = g.new_zeros(len(g), (g.shape[1] - 1) * stride[0] + 1, (g.shape[2] - 1) * stride[1] + 1,
                                  *g.shape[3:])
            stuffed[:, ::stride[0], ::stride[1]] = g
            g = stuffed
        g = F.pad(g, (0, 0) * (g.dim() - 3) + ((kw - 1) * dw, wp - g.shape[2], (kh - 1) * dh, hp - g.shape[1]))
        return [g[:, a * dh + top:a * dh + top + height, b * dw + left:b * dw + left + width]
                for a in range(kh) for b in range(kw)]


class _NoPaths(Exception):
    """A head that is not a tree of adds and ReLUs over the producers."""


def _relu_paths(head: fx.GraphModule, n_lowers: int) -> Optional[Tuple[Dict[int, Tuple[int, ...]], List[fx.Node]]]:
    """``({producer index: indices of the ReLUs on its way}, ReLU nodes)`` when ``head``'s
    output is a tree of two-operand adds and ReLUs over the producers (its last ``n_lowers``
    inputs, each reached once), else None."""
    places = [n for n in head.graph.nodes if n.op == "placeholder"]
    out = next(n for n in head.graph.nodes if n.op == "output").args[0]
    lowers = {node: k for k, node in enumerate(places[len(places) - n_lowers:])}
    relus: List[fx.Node] = []
    plan: Dict[int, Tuple[int, ...]] = {}

    def walk(node, path):
        if node in lowers:
            if lowers[node] in plan:
                raise _NoPaths
            plan[lowers[node]] = path
        elif _act_kind(head, node) == "relu" and len(node.all_input_nodes) == 1 and isinstance(node.args[0], fx.Node):
            relus.append(node)
            walk(node.args[0], (*path, len(relus) - 1))
        elif (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
              and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)):
            walk(node.args[0], path)
            walk(node.args[1], path)
        else:
            raise _NoPaths

    try:
        walk(out, ())
    except _NoPaths:
        return None
    return plan, relus


def _with_outputs(gm: fx.GraphModule, extra: Sequence[fx.Node]) -> fx.GraphModule:
    """A copy of ``gm`` returning ``(its output, *values of the nodes extra)``."""
    new, env = fx.Graph(), {}
    out = new.graph_copy(gm.graph, env)
    new.output((out, *[env[node] for node in extra]))
    return fx.GraphModule(gm, new, class_name=f"{type(gm).__name__}Masks")


def _reached(tap: int, offset: int, stride: int, dilation: int, size: int, out: int) -> Tuple[int, int]:
    """Along one axis: the output positions ``[q0, q1)`` whose tap ``tap`` reads inside x
    (output ``q`` reads x at ``q * stride + tap * dilation - offset``, ``offset`` being the
    zero padding before x, ``size`` x's length, ``out`` the output's)."""
    first = -(-(offset - tap * dilation) // stride)  # ceil division
    last = -(-(offset - tap * dilation + size) // stride)
    return min(out, max(0, first)), min(out, max(0, last))
