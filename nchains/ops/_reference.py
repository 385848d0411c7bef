"""Pure-PyTorch references of every ``nchains`` op.

These define the ops' semantics. Tests compare the compiled kernels against them, and they
document what each fused kernel computes in plain ATen calls.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

IntOrPair = Union[int, Sequence[int]]


def _act(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(u)
    if activation == "none":
        return u
    raise ValueError(f"activation must be 'none' or 'relu', got {activation!r}")


def gate_value(gate_logit: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """``G = sigmoid(gate_logit / temperature)``."""
    return torch.sigmoid(gate_logit / temperature)


def masked_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    scale: torch.Tensor,
    *,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    activation: str = "none",
    gate_logit: Optional[torch.Tensor] = None,
    temperature: float = 0.2,
    residual: Optional[torch.Tensor] = None,
    gate_input: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference of :func:`nchains.ops.masked_conv2d` (conv2d, mul, add, act, blend)."""
    z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    u = scale.view(1, -1, 1, 1) * z
    if residual is not None:
        u = u + residual
    y = _act(u, activation)
    if gate_logit is None:
        return y
    g = gate_value(gate_logit, temperature)
    return g * y + (1 - g) * (input if gate_input is None else gate_input)


def gate(block_out: torch.Tensor, block_in: torch.Tensor, gate_logit: torch.Tensor,
         temperature: float = 0.2) -> torch.Tensor:
    """Reference of :func:`nchains.ops.gate`: ``G * block_out + (1 - G) * block_in``."""
    g = gate_value(gate_logit, temperature)
    return g * block_out + (1 - g) * block_in


def taylor_contributions(activation: torch.Tensor, grad: torch.Tensor, *, reduction: str = "channel",
                         absolute: bool = False) -> torch.Tensor:
    """Reference of :func:`nchains.ops.taylor_contributions`."""
    prod = activation * grad
    if absolute:
        prod = prod.abs()
    if reduction == "none":
        return prod
    if reduction == "channel":
        return prod.flatten(2).sum(2) if prod.dim() > 2 else prod
    raise ValueError(f"reduction must be 'channel' or 'none', got {reduction!r}")
