"""The modules a scored model runs per unit: a conv filter layer with BatchNorm folded in and a
score per filter (:class:`_ScoredConv`), a hidden Linear with a score per neuron
(:class:`_ScoredLinear`), and the float64 BatchNorm fold they (and the compact model) share.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nchains.graph.analysis import ConvUnit, LinearUnit

try:
    from nchains import ops as _ops
except ImportError:  # compiled extension not built: same semantics, unfused
    from nchains.ops import _reference as _ops


def fold_bn64(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fold eval-mode BN into the conv in float64: ``w * s``, ``(b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)``; the bias is None when neither conv nor BN has one.

    ``conv`` is an ``nn.Conv2d`` or any object with its ``weight``/``bias`` (a unit's
    :meth:`~nchains.graph.units.ConvUnit.params`: what a Conv2d subclass really convolves with)."""
    w = conv.weight.detach().double()
    b = None if conv.bias is None else conv.bias.detach().double()
    if bn is not None:
        s = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        shift = torch.zeros_like(s)
        if bn.weight is not None:
            s = s * bn.weight.detach().double()
            shift = bn.bias.detach().double()
        b = ((0.0 if b is None else b) - bn.running_mean.detach().double()) * s + shift
        w = w * s.view(-1, 1, 1, 1)
    return w, b


def _fold(conv: nn.Conv2d,
          bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`fold_bn64` cast back to the conv's dtype."""
    w, b = fold_bn64(conv, bn)
    dtype = conv.weight.dtype
    return w.to(dtype), None if b is None else b.to(dtype)


class _ScoredConv(nn.Module):
    """One unit: ``act(score * bn(conv(pad(x))))``, optionally gated with its own input.

    ``conv`` is anything with the ``weight``/``bias`` the unit's conv computes with
    (:meth:`ConvUnit.params`, or the Conv2d itself); ``pad`` is the unit's asymmetric zero
    pre-pad (``unit.pre_pad``, none for most convs)."""

    def __init__(self, unit: ConvUnit, conv, bn: Optional[nn.BatchNorm2d], temperature: float):
        super().__init__()
        weight, bias = _fold(conv, bn)
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            # oneDNN's fastest float32 CPU convolutions are channels_last: a channels_last
            # weight makes the conv (and so the whole scored network) run in that layout.
            # (empty_like + copy_: canonical strides even for size-1 dims, e.g. one input channel)
            weight = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation = unit.stride, unit.padding, unit.dilation
        self.groups, self.temperature = unit.groups, temperature
        self.pre_pad = list(unit.pre_pad) if any(unit.pre_pad) else None
        self.fused = unit.act in (None, "relu")
        self.activation = "relu" if unit.act == "relu" else "none"
        self.act = None if self.fused else copy.deepcopy(unit.act_module)

    def forward(self, x: torch.Tensor, score: torch.Tensor, gate_logit: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, gate_input: Optional[torch.Tensor] = None,
                activation: Optional[str] = None) -> torch.Tensor:
        """``act(score * bn(conv(x)))``, gated with ``x`` by ``gate_logit``; a fused residual
        tail passes ``residual`` (added before ``activation``) and ``gate_input`` (the block's
        input the gate blends with)."""
        if self.pre_pad is not None:  # the gate blends with the unpadded input
            if gate_logit is not None and gate_input is None:
                gate_input = x
            x = F.pad(x, self.pre_pad)
        if self.fused:
            return _ops.masked_conv2d(
                x, self.weight, self.bias, score, stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=self.groups, activation=activation or self.activation,
                gate_logit=gate_logit, temperature=self.temperature, residual=residual, gate_input=gate_input)
        y = self.act(_ops.masked_conv2d(
            x, self.weight, self.bias, score, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, activation="none"))
        return y if gate_logit is None else _ops.gate(y, x if gate_input is None else gate_input,
                                                      gate_logit, self.temperature)


class _ScoredLinear(nn.Module):
    """A hidden Linear with a score per output neuron: ``act(score * linear(x))``."""

    def __init__(self, unit: LinearUnit, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.act = copy.deepcopy(unit.act_module)

    def forward(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) * score
        return y if self.act is None else self.act(y)
