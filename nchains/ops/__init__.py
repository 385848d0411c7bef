"""Typed Python API over the compiled ops ``torch.ops.nchains.*``.

Every op has a CPU kernel and a CUDA kernel (compiled when the extension is built with CUDA),
a fake (meta) kernel for ``torch.compile``/``torch.export``, a C++ autograd kernel whose
backward is an op of its own, and a pure-PyTorch reference in :mod:`nchains._reference`.

Supported dtypes are float32 and float64; any strides are accepted (contiguous, channels_last
or non-contiguous views). All tensor arguments of one call must share dtype and device.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from nchains import _C  # noqa: F401  (loads the shared library, registering torch.ops.nchains)
from nchains.ops import _fake  # noqa: F401  (fake kernels; autograd kernels live in csrc/autograd)

IntOrPair = Union[int, Sequence[int]]

ACTIVATIONS = ("none", "relu")
REDUCTIONS = ("channel", "none")


def _pair(value: IntOrPair, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


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
    """Convolution with a per-filter score, a residual add, an activation and a gate, fused.

    Computes ``z = conv2d(input, weight, bias, stride, padding, dilation, groups)`` with
    ATen's convolution, then in one pass ``y = act(scale[None, :, None, None] * z + residual)``
    and, if ``gate_logit`` is given, ``G * y + (1 - G) * x`` with
    ``G = sigmoid(gate_logit / temperature)`` and ``x = gate_input`` (default: ``input``, a
    layer gate). With ``residual`` and ``gate_input`` one call is the tail of a residual block:
    its last conv, the add of the shortcut, the ReLU after it and the block's gate. The
    backward computes ``grad_z``, ``grad_residual``, the per-filter
    ``grad_scale = sum_{n,h,w} dL/du * z`` and ``grad_gate_logit`` in one fused pass, then
    ATen's convolution backward.

    Args:
        input (Tensor[N, C_in, H, W]): input feature map.
        weight (Tensor[C_out, C_in / groups, kH, kW]): filters (e.g. with BatchNorm folded).
        bias (Tensor[C_out] or None): per-filter bias.
        scale (Tensor[C_out]): per-filter score; 0 gives an exactly-zero output channel
            (before the gate blend).
        stride, padding, dilation: int or pair, as in :func:`torch.nn.functional.conv2d`.
        groups (int): number of groups; ``groups == C_in`` is a depthwise convolution.
        activation (str): ``"none"`` or ``"relu"``.
        gate_logit (Tensor[] or None): 0-d logit of the gate. Requires the output to have
            the shape of what it blends with (``gate_input``, else ``input``).
        temperature (float): gate temperature ``T`` (> 0).
        residual (Tensor[N, C_out, H_out, W_out] or None): added after the score, before
            the activation.
        gate_input (Tensor[N, C_out, H_out, W_out] or None): what the gate blends with
            instead of ``input`` (needs ``gate_logit``). May be the ``residual`` tensor
            itself (an identity shortcut): its gradient is then computed in one pass.

    Returns:
        Tensor[N, C_out, H_out, W_out].

    Example:
        >>> x = torch.randn(2, 8, 16, 16)
        >>> w = torch.randn(8, 8, 3, 3)
        >>> y = masked_conv2d(x, w, None, torch.ones(8), padding=1, activation="relu",
        ...                   gate_logit=torch.tensor(0.0))
    """
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return torch.ops.nchains.masked_conv2d(
        input, weight, bias, scale, list(stride), list(padding), list(dilation), int(groups),
        activation, gate_logit, float(temperature), residual, gate_input)


def gate(block_out: torch.Tensor, block_in: torch.Tensor, gate_logit: torch.Tensor,
         temperature: float = 0.2) -> torch.Tensor:
    """Gate a residual block: ``G * block_out + (1 - G) * block_in``, ``G = sigmoid(logit / T)``.

    Args:
        block_out (Tensor[N, C, *]): output of the gated block ``f(x)``.
        block_in (Tensor[N, C, *]): the block's input ``x`` (same shape).
        gate_logit (Tensor[]): 0-d gate logit ``alpha``.
        temperature (float): ``T`` (> 0).

    Returns:
        Tensor with the shape of ``block_out``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return torch.ops.nchains.gate(block_out, block_in, gate_logit, float(temperature))


def taylor_contributions(activation: torch.Tensor, grad: torch.Tensor, *, reduction: str = "channel",
                         absolute: bool = False) -> torch.Tensor:
    """Per-neuron first-order Taylor contributions ``a * dy/da``, in one pass.

    Args:
        activation (Tensor[N, C, *spatial] or Tensor[N, C]): activations ``a``.
        grad (Tensor of the same shape): gradients ``dy/da``.
        reduction (str): ``"channel"`` sums over the spatial dims, giving Tensor[N, C]
            (no intermediate ``a * g`` tensor is formed); ``"none"`` returns ``a * g``
            elementwise with the inputs' shape.
        absolute (bool): use ``|a * g|`` instead of ``a * g``.

    Returns:
        Tensor[N, C] for ``reduction="channel"``, else a tensor of the inputs' shape.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return torch.ops.nchains.taylor_contributions(activation, grad, reduction, bool(absolute))


def cuda_available() -> bool:
    """True when ``nchains._C`` was built with CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("nchains::gate", "CUDA")
