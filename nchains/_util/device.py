"""Where a model lives: the one place that decides the device and float dtype of the example
inputs, constants and buffers that nchains builds for a model (DESIGN.md: "device and dtype
follow the model; nothing assumes CPU float32")."""

from __future__ import annotations

import contextlib
from typing import Tuple

import torch
from torch import nn


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """The device of ``model``'s tensors and the dtype of its floating-point parameters.

    The dtype is that of the first floating-point parameter (else buffer); a model without
    any tensor is taken to be CPU float32.

    Args:
        model (nn.Module): the model.

    Returns:
        (torch.device, torch.dtype).

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.
        ValueError: when its parameters and buffers sit on more than one device (nchains needs
            the whole model on one device).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = [*model.parameters(), *model.buffers()]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"model has parameters or buffers on several devices "
                         f"({', '.join(sorted(map(str, devices)))}); move the whole model to one device")
    floating = [t for t in tensors if t.is_floating_point()]
    device = next(iter(devices)) if devices else torch.device("cpu")
    dtype = floating[0].dtype if floating else torch.float32
    return device, dtype


def example_input(model: nn.Module, input_shape, batch: int = 1) -> torch.Tensor:
    """Zeros ``Tensor[batch, *input_shape]`` on ``model``'s device, in its dtype."""
    device, dtype = model_device_dtype(model)
    return torch.zeros(batch, *input_shape, dtype=dtype, device=device)


@contextlib.contextmanager
def full_precision():
    """float32 convolutions and matrix products in full IEEE precision inside the block.

    cuDNN runs float32 convolutions in TF32 by default on NVIDIA GPUs (10-bit mantissa: errors
    of ~1e-3 relative), which would make two exact computations of one chain (scored, compact,
    masked) disagree by more than a verification tolerance. Checks run inside this block; the
    optimisation loops keep the defaults. No effect on the CPU.
    """
    flags = [torch.backends.cudnn, torch.backends.cuda.matmul]
    saved = []
    for flag in flags:
        try:
            saved.append((flag, flag.allow_tf32))
        except RuntimeError:  # the user mixed torch's legacy and new TF32 settings: left alone
            continue
    try:
        for flag, _ in saved:
            flag.allow_tf32 = False
        yield
    finally:
        for flag, value in saved:
            flag.allow_tf32 = value
