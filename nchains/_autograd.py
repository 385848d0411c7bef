"""Autograd formulas of the ops; each backward is an op of its own (``_<op>_backward``)."""

from __future__ import annotations

import torch


def _masked_conv2d_setup(ctx, inputs, output):
    input, weight, bias, scale, stride, padding, dilation, groups, activation, gate_logit, temperature = inputs
    _, z = output
    # z is returned only so that the backward does not recompute the convolution.
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, z, scale, gate_logit)
    ctx.has_bias = bias is not None
    ctx.conf = (stride, padding, dilation, groups, activation, temperature)


def _masked_conv2d_backward(ctx, grad_out, _grad_z):
    if grad_out is None:
        return (None,) * 11
    input, weight, z, scale, gate_logit = ctx.saved_tensors
    stride, padding, dilation, groups, activation, temperature = ctx.conf
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias]
    gi, gw, gb, gs, gg = torch.ops.nchains._masked_conv2d_backward(
        grad_out, input, weight, z, scale, stride, padding, dilation, groups, activation, gate_logit, temperature,
        mask)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, gs if need[3] else None,
            None, None, None, None, None, gg if gate_logit is not None and need[9] else None, None)


def _gate_setup(ctx, inputs, output):
    block_out, block_in, gate_logit, temperature = inputs
    ctx.save_for_backward(block_out, block_in, gate_logit)
    ctx.temperature = temperature


def _gate_backward(ctx, grad_out):
    block_out, block_in, gate_logit = ctx.saved_tensors
    gy, gx, gg = torch.ops.nchains._gate_backward(grad_out, block_out, block_in, gate_logit, ctx.temperature)
    need = ctx.needs_input_grad
    return gy if need[0] else None, gx if need[1] else None, gg if need[2] else None, None


def _taylor_setup(ctx, inputs, output):
    activation, grad, reduction, absolute = inputs
    ctx.save_for_backward(activation, grad)
    ctx.conf = (reduction, absolute)


def _taylor_backward(ctx, grad_out):
    activation, grad = ctx.saved_tensors
    ga, gg = torch.ops.nchains._taylor_contributions_backward(grad_out, activation, grad, *ctx.conf)
    need = ctx.needs_input_grad
    return ga if need[0] else None, gg if need[1] else None, None, None


torch.library.register_autograd("nchains::_masked_conv2d", _masked_conv2d_backward,
                                setup_context=_masked_conv2d_setup)
torch.library.register_autograd("nchains::gate", _gate_backward, setup_context=_gate_setup)
torch.library.register_autograd("nchains::taylor_contributions", _taylor_backward, setup_context=_taylor_setup)
