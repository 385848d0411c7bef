"""Checks of input image batches: type, shape, dtype and finiteness. One NaN pixel turns every
loss, score and metric of an extraction into NaN without an error, so inputs are checked before
any work."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_images(images, input_shape: Optional[Sequence[int]] = None, name: str = "images") -> torch.Tensor:
    """Returns ``images`` when it is a finite floating-point ``Tensor[N, C, H, W]``, N >= 1.

    Args:
        images: the argument to check.
        input_shape (sequence of 3 ints): the ``[C, H, W]`` it must have, or None for any.
        name (str): the argument's name, for the messages.

    Raises:
        TypeError: not a Tensor.
        ValueError: wrong shape, an integer dtype, or NaN/Inf values (see :func:`check_finite`).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor[N, C, H, W], got {type(images).__name__}")
    if input_shape is None:
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"{name} must have shape [N, C, H, W] with N >= 1, got {tuple(images.shape)}")
    elif images.dim() != 4 or list(images.shape[1:]) != list(input_shape) or len(images) < 1:
        raise ValueError(f"{name} must have shape [N, {', '.join(map(str, input_shape))}] (the chain's "
                         f"input shape) with N >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (preprocessed), got {images.dtype}")
    return check_finite(images, name)


def check_finite(tensor: torch.Tensor, name: str, item: str = "image") -> torch.Tensor:
    """Returns ``tensor`` when every value is finite; raises a one-line ValueError otherwise.

    Args:
        tensor (Tensor[N, ...]): a batch; integer tensors are always finite.
        name (str): the argument's name, for the message (``"images"``).
        item (str): what one row of the batch is called (``"image"``).

    Raises:
        ValueError: ``images contains 3 non-finite values (NaN/Inf) at image 0; ...``, naming
            the count and the first rows (at most 5) that hold one.
    """
    if not tensor.is_floating_point() and not tensor.is_complex():
        return tensor
    bad = ~torch.isfinite(tensor.detach())
    if not bool(bad.any()):
        return tensor
    count = int(bad.sum())
    if tensor.dim() == 0:
        where = ""
    else:
        rows = torch.nonzero(bad.reshape(len(tensor), -1).any(1)).flatten().tolist()
        shown = ", ".join(map(str, rows[:5])) + (f" (and {len(rows) - 5} more)" if len(rows) > 5 else "")
        where = f" at {item}{'s' if len(rows) > 1 else ''} {shown}"
    raise ValueError(f"{name} contains {count} non-finite value{'s' if count > 1 else ''} (NaN/Inf){where}; "
                     "accepted: finite numbers only (check the preprocessing)")
