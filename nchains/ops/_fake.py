"""Fake (meta) kernels of every op, for torch.compile, torch.export and FakeTensor tracing.

They mirror the layout rules of ``csrc/common/checks.h``: a 4-d tensor dense in channels_last
(and not plain contiguous, or both with channels_last's own strides over a single channel)
gives channels_last outputs; everything else is contiguous.
"""

from __future__ import annotations

import torch

_LIB = "nchains"


def _channels_last(t: torch.Tensor) -> bool:
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        return False
    if not t.is_contiguous():
        return True
    return t.shape[1] == 1 and t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _conv_out_shape(input, weight, stride, padding, dilation):
    shape = [input.shape[0], weight.shape[0]]
    for d in range(2):
        extent = input.shape[2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1
        torch._check(extent >= 0, lambda: "input spatial size is too small for the kernel")
        shape.append(extent // stride[d] + 1)
    return shape


@torch.library.register_fake(f"{_LIB}::_masked_conv2d")
def _masked_conv2d_fake(input, weight, bias, scale, stride, padding, dilation, groups, activation, gate_logit,
                        temperature, residual=None, gate_input=None):
    shape = _conv_out_shape(input, weight, stride, padding, dilation)
    fmt = _fmt(_channels_last(input) or _channels_last(weight))
    out = input.new_empty(shape).contiguous(memory_format=fmt)
    z = input.new_empty(shape).contiguous(memory_format=fmt)
    return out, z


@torch.library.register_fake(f"{_LIB}::masked_conv2d")
def _masked_conv2d_public_fake(input, weight, bias, scale, stride, padding, dilation, groups, activation,
                               gate_logit, temperature, residual=None, gate_input=None):
    return _masked_conv2d_fake(input, weight, bias, scale, stride, padding, dilation, groups, activation,
                               gate_logit, temperature, residual, gate_input)[0]


@torch.library.register_fake(f"{_LIB}::_masked_conv2d_backward")
def _masked_conv2d_backward_fake(grad_out, input, weight, z, scale, stride, padding, dilation, groups, activation,
                                 gate_logit, temperature, residual, gate_input, conv_mask):
    empty = input.new_empty((0,))
    grad_input = input.new_empty(input.shape).contiguous(memory_format=_fmt(_channels_last(input))) \
        if conv_mask[0] else empty
    grad_weight = weight.new_empty(weight.shape).contiguous(memory_format=_fmt(_channels_last(weight))) \
        if conv_mask[1] else weight.new_empty((0,))
    grad_bias = weight.new_empty((weight.shape[0],)) if conv_mask[2] else weight.new_empty((0,))
    grad_scale = scale.new_empty(scale.shape)
    grad_gate = gate_logit.new_empty(()) if gate_logit is not None else input.new_empty((0,))
    fmt = _fmt(_channels_last(input) or _channels_last(weight))  # the forward's layout
    grad_residual = z.new_empty(z.shape).contiguous(memory_format=fmt) if residual is not None else empty
    shared = residual is not None and gate_input is not None and residual is gate_input  # one tensor: one gradient
    grad_gate_input = z.new_empty(z.shape).contiguous(memory_format=fmt) \
        if gate_input is not None and gate_logit is not None and not shared else empty
    return grad_input, grad_weight, grad_bias, grad_scale, grad_gate, grad_residual, grad_gate_input


def _like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape).contiguous(memory_format=_fmt(_channels_last(t)))


@torch.library.register_fake(f"{_LIB}::gate")
def _gate_fake(block_out, block_in, gate_logit, temperature):
    torch._check(block_in.shape == block_out.shape, lambda: "block_in must have the shape of block_out")
    return _like(block_out)


@torch.library.register_fake(f"{_LIB}::_gate_backward")
def _gate_backward_fake(grad_out, block_out, block_in, gate_logit, temperature):
    return _like(block_out), _like(block_out), gate_logit.new_empty(())


@torch.library.register_fake(f"{_LIB}::taylor_contributions")
def _taylor_fake(activation, grad, reduction, absolute):
    if reduction == "channel":
        return activation.new_empty(activation.shape[:2])
    return _like(activation)


@torch.library.register_fake(f"{_LIB}::_taylor_contributions_backward")
def _taylor_backward_fake(grad_out, activation, grad, reduction, absolute):
    return _like(activation), _like(activation)
