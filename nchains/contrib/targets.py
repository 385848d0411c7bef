"""The ``target`` argument of :func:`nchains.contributions`: which logit Φ is explained, per image.

The response Φ is the pre-softmax logit of the target class (as the papers): ``"pred"`` is the
original model's argmax per image, an int is one class for every image, a LongTensor[N] one
class per image.
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["check_target", "output_width", "resolve_targets"]

Target = Union[str, int, torch.Tensor]


def check_target(target, n: int) -> None:
    """TypeError/ValueError for a ``target`` of the wrong kind or shape (before any forward)."""
    if isinstance(target, str):
        if target != "pred":
            raise ValueError(f"target must be 'pred', an int class index or a LongTensor[N], got {target!r}")
        return
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor (class indices), got dtype {target.dtype}")
        if target.dim() > 1 or (target.dim() == 1 and len(target) != n):
            raise ValueError(f"target must be a scalar or a LongTensor[N] with N = {n} (one class per image), "
                             f"got shape {list(target.shape)}")
        return
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target must be 'pred', an int class index or a LongTensor[N], got {type(target).__name__}")


def output_width(graph) -> int:
    """K of the logits Tensor[N, K] the analysed model returns (from the analysis' shapes);
    ValueError when it returns anything else."""
    out = next(n for n in graph.graph_module.graph.nodes if n.op == "output").args[0]
    meta = out.meta.get("tensor_meta") if hasattr(out, "meta") else None
    if not hasattr(meta, "shape") or len(meta.shape) != 2:
        what = f"shape {list(meta.shape)}" if hasattr(meta, "shape") else type(out).__name__
        raise ValueError(f"model must return logits Tensor[N, K] (pre-softmax), got {what}")
    return int(meta.shape[1])


def resolve_targets(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """The target class of every image.

    Args:
        target: ``"pred"``, an int, a 0-d integer tensor or an integer Tensor[N].
        logits (Tensor[N, K]): the original model's outputs.

    Returns:
        LongTensor[N] on ``logits``' device, every value in ``[0, K)``.

    Raises:
        TypeError, ValueError: a target of the wrong kind, shape, or outside ``[0, K)``.
    """
    n, k = logits.shape
    check_target(target, n)
    if isinstance(target, str):
        return logits.detach().argmax(1)
    t = torch.as_tensor(target).to(device=logits.device, dtype=torch.long)
    t = t.expand(n).clone() if t.dim() == 0 else t.clone()
    bad = (t < 0) | (t >= k)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"target must be a class index in [0, {k}) (the model has {k} outputs), got "
                         f"{int(t[first])}{f' for image {first}' if t.numel() > 1 else ''}")
    return t
