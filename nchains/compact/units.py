"""Compacting one filter unit: a Conv2d (+ BatchNorm2d + activation) or Linear (+ activation)
rebuilt with only its live filters and live input channels, BatchNorm and scores folded in (or
kept as explicit ops), and the constant input channels folded into its bias.
"""

from __future__ import annotations

import copy
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from nchains.compact.emit import _detached, _Emitter, _nonzero, _positions, _State
from nchains.graph.analysis import ConvUnit, LinearUnit
from nchains.instrument.scored_model import fold_bn64


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


def _pre_pad(x: torch.Tensor, u: ConvUnit) -> torch.Tensor:
    """``x (Tensor[N, C, H, W])`` with the unit's asymmetric zero pre-pad (if any)."""
    return F.pad(x, list(u.pre_pad)) if any(u.pre_pad) else x


def _unit_output(conv, bn: Optional[nn.BatchNorm2d], u: ConvUnit, score: torch.Tensor,
                 act: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``act(score * bn(conv(x)))`` for one batch-independent input ``x (Tensor[C, H, W])``,
    in the model's dtype as the masked model computes it: ``Tensor[C_out, H_out, W_out]``
    (``conv``: the unit's :meth:`~nchains.graph.units.ConvUnit.params`)."""
    dtype = conv.weight.dtype
    with torch.no_grad():
        if _nonzero(x):
            z = F.conv2d(_pre_pad(x.unsqueeze(0).to(dtype), u), conv.weight, conv.bias, u.stride, u.padding,
                         u.dilation, u.groups)
        else:  # zero input: only the bias, the same at every pixel
            z = (conv.bias if conv.bias is not None else conv.weight.new_zeros(u.out_channels)).view(1, -1, 1, 1)
        if bn is not None:
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        y = z * score.to(dtype).view(1, -1, 1, 1)
        y = act(y) if act is not None else y
    return y[0].expand(u.out_channels, *u.output_shape[2:]).clone()


def _dead_part(y: torch.Tensor, live_out: List[int]) -> torch.Tensor:
    """The unit output ``y`` on constant input with the computed channels ``live_out`` zeroed:
    the ``const`` of the unit's channel state."""
    const = y.clone()
    if live_out:
        const[torch.as_tensor(live_out)] = 0
    return const


class _UnitBuilder(_Emitter):
    """Adds the conv and linear units to the graph being written by :class:`_Emitter`."""

    def _not_run(self, name: str, const: torch.Tensor) -> _State:
        """A unit with no live filter: it does not run, its output is the constant ``const``."""
        self.layers[name] = {"module": None, "out": [], "in": []}
        return _State(None, [], const)

    def _unit_scores(self, name: str, size: int) -> torch.Tensor:
        s = self.scores.get(name)
        return torch.ones(size, dtype=torch.float64) if s is None else s.double()

    def conv_unit(self, u: ConvUnit) -> _State:
        s_in: _State = self.env[u.input]
        conv = u.params(self.gm)  # what the conv computes with (a subclass may transform them)
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
        const = _dead_part(y, live_out)
        if not live_out:
            return self._not_run(u.name, const)
        # channel_multiple: an ungrouped conv reads and writes whole blocks of channels, the
        # extra ones exactly zero (zero input columns; zero filters, bias and correction, neutral
        # BN and score, kept only when the activation maps 0 to 0). A pruned input channel set is
        # padded; a complete one (the model input) keeps the model's own channel count.
        out_pad = 0
        if u.groups == 1 and self.multiple > 1:
            if len(s_in.live) < s_in.channels:
                s_in = self.repad(s_in, self.padding(len(s_in.live)))
            zeros = torch.zeros(1, u.out_channels, 1, 1, dtype=conv.weight.dtype)
            zero_act = act is None or not _nonzero(act(zeros))
            out_pad = self.padding(len(live_out)) if zero_act else 0

        w64, b64 = _fold64(conv, bn)
        raw_w = conv.weight.detach()
        source = raw_w if self.keep_scores else (w64 * score.view(-1, 1, 1, 1)).to(raw_w.dtype)
        weight, select, slots, n_in, s_in = self._packed_weight(u, s_in, groups, source, out_pad)
        n_slots = len(slots) - out_pad
        x = s_in.node
        if select != list(range(s_in.width)):
            x = self.call(torch.index_select, x, 1, self.buffer(torch.as_tensor(select), f"{u.name}_in"))
        real = slots >= 0
        o_real = slots[real]
        bias = torch.zeros(len(slots), dtype=torch.float64)
        bias[real] = (b64 * score)[o_real]
        corr = self._constant_input_maps(u, s_in, slots, raw_w, w64, score)
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
        if any(u.pre_pad):  # asymmetric "same" padding: zeros keep padded channels zero
            x = self.call(F.pad, x, list(u.pre_pad))
        target = self.module(new, u.conv)
        out = self.g.call_module(target, (x,))
        if corr is not None:
            out = self.add_const(out, corr, f"{u.name}_correction")
        if self.keep_scores:
            if bn is not None:
                bn_new = _slice_bn(bn, [o if o >= 0 else None for o in slots.tolist()])
                out = self.g.call_module(self.module(bn_new, u.bn), (out,))
            scale = torch.ones(len(slots), dtype=torch.float64)
            scale[real] = score[o_real]
            out = self.call(operator.mul, out, self.buffer(scale.to(raw_w.dtype).view(1, -1, 1, 1),
                                                           f"{u.name}_score"))
        if act is not None:
            out = self.g.call_module(self.module(act, f"{u.name}_act"), (out,))
        if not bool(real[:n_slots].all()):  # drop the group padding, keep out_pad
            keep = torch.cat([torch.nonzero(real[:n_slots]).flatten(), torch.arange(n_slots, len(slots))])
            out = self.call(torch.index_select, out, 1, self.buffer(keep, f"{u.name}_out"))
        self.layers[u.name] = {"module": target, "out": live_out,
                               "in": [c for ins, _ in groups for c in ins]}
        self.taps[u.name] = (out, live_out)
        return _State(out, live_out, const, out_pad)

    def _packed_weight(self, u: ConvUnit, s_in: _State, groups, source: torch.Tensor, out_pad: int):
        """The compact conv's weight ``[slots, n_in, kh, kw]``, which input positions it reads
        (``select``) and the original filter of each output slot (-1: zero padding).

        Uneven groups are padded: extra inputs repeat a live channel with zero weights, extra
        filters have zero weights and are dropped after the conv. Returns
        ``(weight, select, slots, n_in, s_in)``."""
        cin_g = u.in_channels // u.groups
        n_in = max(len(i) for i, _ in groups)
        n_out = max(len(o) for _, o in groups)
        select: List[int] = []
        slots = torch.full((len(groups) * n_out + out_pad,), -1, dtype=torch.long)  # original filter per slot
        weight = torch.zeros(len(slots), n_in, *u.kernel_size, dtype=source.dtype)
        for j, (ins, outs) in enumerate(groups):
            pos = _positions(s_in.live, ins)
            select += pos + [pos[0]] * (n_in - len(ins))
            o = torch.as_tensor(outs)
            slots[j * n_out: j * n_out + len(outs)] = o
            weight[j * n_out: j * n_out + len(outs), : len(ins)] = source[o][:, torch.as_tensor(ins) % cin_g]
        if u.groups == 1 and s_in.pad:  # the input's zero channels, read with zero weights
            select += list(range(len(s_in.live), s_in.width))
            n_in = s_in.width
            weight = torch.cat([weight, weight.new_zeros(len(slots), s_in.pad, *u.kernel_size)], 1)
        return weight, select, slots, n_in, s_in

    def _constant_input_maps(self, u: ConvUnit, s_in: _State, slots: torch.Tensor, raw_w: torch.Tensor,
                             w64: torch.Tensor, score: torch.Tensor) -> Optional[torch.Tensor]:
        """Contribution of the constant input channels to each output slot, ``[slots, H, W]``
        in float64 (exact, zero-padding borders included); None when they are all zero."""
        if not _nonzero(s_in.const):
            return None
        real = slots >= 0
        ref_w = raw_w.double() if self.keep_scores else w64 * score.view(-1, 1, 1, 1)
        maps = F.conv2d(_pre_pad(s_in.const.unsqueeze(0).double(), u), ref_w, None, u.stride, u.padding,
                        u.dilation, u.groups)[0]
        corr = torch.zeros(len(slots), *maps.shape[1:], dtype=torch.float64)
        corr[real] = maps[slots[real]]
        return corr

    def _enlarging_pool(self, u: LinearUnit, s_in: _State) -> Optional[Tuple[fx.Node, torch.Tensor]]:
        """``(flatten(x), P)`` when the Linear reads ``flatten(adaptive_avg_pool2d(x))`` and the
        pooling enlarges the map (VGG's 7x7 pool after a 4x4 map at 128x128 inputs: every
        output averages a few inputs): ``P[i, o]`` is input pixel i's weight in output pixel o,
        so the Linear's weights times ``P^T`` read ``x`` directly, with ``H_in W_in / (H_out
        W_out)`` of the weights (3x fewer for 4x4 -> 7x7; memory-bound at batch 1). Else None."""
        flat_orig, flat = u.input, s_in.node
        if flat is None or len(flat_orig.users) != 1 or flat.users or flat.op != "call_function" \
                or flat.target is not torch.flatten or tuple(flat.args[1:]) != (1,) or flat.kwargs:
            return None
        pool, pool_orig = flat.args[0], flat_orig.all_input_nodes[0]
        adaptive = (pool.op == "call_module" and isinstance(self.root.get_submodule(pool.target),
                                                             nn.AdaptiveAvgPool2d)) \
            or (pool.op == "call_function" and pool.target is F.adaptive_avg_pool2d)
        if not adaptive or len(pool.users) != 1 or len(pool_orig.users) != 1 or not pool_orig.all_input_nodes:
            return None
        size_in = tuple(pool_orig.all_input_nodes[0].meta["tensor_meta"].shape[2:])
        size_out = tuple(pool_orig.meta["tensor_meta"].shape[2:])
        if len(size_in) != 2 or len(size_out) != 2 or size_in[0] * size_in[1] >= size_out[0] * size_out[1]:
            return None
        n_in = size_in[0] * size_in[1]
        basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, *size_in)
        pool_map = F.adaptive_avg_pool2d(basis, size_out).reshape(n_in, -1)
        return self.call(torch.flatten, pool.args[0], 1), pool_map

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
        const = _dead_part(y, live_out)
        if not live_out:
            return self._not_run(u.name, const)
        o_idx, i_idx = torch.as_tensor(live_out), torch.as_tensor(s_in.live)
        b64 = torch.zeros(u.out_features, dtype=torch.float64) if lin.bias is None else lin.bias.detach().double()
        dead = torch.ones(u.in_features, dtype=torch.bool)
        dead[i_idx] = False
        extra = w.double()[:, dead] @ s_in.const.double()[dead] if _nonzero(s_in.const) else None
        keep = self.keep_scores or not scored  # exact copies; scores (if any) as a multiply
        # zero weights for the input's zero (padding) features
        new = nn.Linear(s_in.width, len(live_out), bias=lin.bias is not None or extra is not None)
        new = new.to(w.dtype).eval().requires_grad_(False)
        n_live = len(s_in.live)
        with torch.no_grad():
            new.weight.zero_()
            if keep:
                new.weight[:, :n_live] = w[o_idx][:, i_idx]
                if new.bias is not None:
                    new.bias.copy_(lin.bias.detach()[o_idx] if extra is None else (b64 + extra)[o_idx].to(w.dtype))
            else:
                new.weight[:, :n_live] = (w.double()[o_idx][:, i_idx] * score[o_idx, None]).to(w.dtype)
                if new.bias is not None:
                    new.bias.copy_(((b64 + (0 if extra is None else extra)) * score)[o_idx].to(w.dtype))
        x = s_in.node
        pooled = None if self.keep_scores else self._enlarging_pool(u, s_in)
        if pooled is not None:  # fold the pooling's averaging into the weights
            x, pool_map = pooled
            w_in = new.weight.detach().double().reshape(len(live_out), -1, pool_map.shape[1]) @ pool_map.T
            new.weight = nn.Parameter(w_in.reshape(len(live_out), -1).to(w.dtype), requires_grad=False)
            new.in_features = new.weight.shape[1]
        target = self.module(new, u.first.target)
        out = self.g.call_module(target, (x,))
        if scored and keep:
            out = self.call(operator.mul, out, self.buffer(score[o_idx].to(w.dtype), f"{u.name}_score"))
        if act is not None:
            out = self.g.call_module(self.module(act, f"{u.name}_act"), (out,))
        self.layers[u.name] = {"module": target, "out": live_out, "in": list(s_in.live)}
        self.taps[u.name] = (out, live_out)
        return _State(out, live_out, const)
