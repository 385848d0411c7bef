"""What every analysis of a chain shares: one context (the model, the chain's masked model, the
images and both models' outputs on them), batched forwards, the fidelity numbers and the
argument checks.

Device and dtype follow the model: images (and held-out pools) are moved to the model's device
and cast to its float dtype before any forward.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nchains._util.device import model_device_dtype
from nchains._util.tensors import check_images
from nchains.graph.analysis import ModelGraph, graph_for
from nchains.neurochains.chain import Chain
from nchains.neurochains.config import _check_int, _check_real
from nchains.neurochains.phase import _progress

#: Rows per forward pass of the batched analyses (images x variants).
DEFAULT_BATCH = 256
MAX_BATCH = 1 << 20

__all__ = ["Context", "DEFAULT_BATCH", "build_context", "check_batch_size", "check_int", "check_real",
           "fidelity_numbers", "json_float", "logits_of", "progress_bar"]


def check_real(name: str, value: Any, bound: str = "ge0") -> float:
    """``value`` as a float when finite and ``>= 0`` (``bound="ge0"``) or ``> 0`` (``"gt0"``)."""
    return _check_real(name, value, bound, False)


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; TypeError/ValueError naming ``name`` otherwise."""
    return _check_int(name, value, low, high)


def check_batch_size(batch_size: Any) -> int:
    return check_int("batch_size", batch_size, 1, MAX_BATCH)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (or None when ``enabled`` is False); callers ``update`` and ``close`` it."""
    return _progress(total, desc, bool(enabled))


def json_float(x: Any) -> Optional[float]:
    """``float(x)``, or None for NaN/infinity (JSON has no such numbers)."""
    v = float(x)
    return v if math.isfinite(v) else None


def check_module(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


@torch.no_grad()
def logits_of(module: nn.Module, x: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """``module(x)`` in batches of ``batch_size`` rows, without autograd.

    Args:
        module (nn.Module): a classifier (original or masked model).
        x (Tensor[N, C, H, W]): on the module's device, in its dtype.
        batch_size (int): rows per forward.

    Returns:
        Tensor[N, classes].
    """
    return torch.cat([module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def fidelity_numbers(p_logits: torch.Tensor, q_logits: torch.Tensor) -> Dict[str, float]:
    """How well ``q`` (a chain) preserves ``p`` (the original), as in :func:`nchains.extract`'s
    metrics: ``kl`` = mean over images of KL(softmax p || softmax q), ``agreement`` = fraction of
    images where argmax q = argmax p, ``prob_drop`` = mean of p[y] - q[y] with y = argmax p.

    Args:
        p_logits (Tensor[N, classes]): the original model's logits.
        q_logits (Tensor[N, classes]): the chain's logits on the same images.
    """
    p_logp, q_logp = F.log_softmax(p_logits.double(), 1), F.log_softmax(q_logits.double(), 1)
    y = p_logits.argmax(1)
    kl = F.kl_div(q_logp, p_logp, log_target=True, reduction="batchmean")
    agree = (q_logits.argmax(1) == y).double().mean()
    drop = (p_logp.exp() - q_logp.exp()).gather(1, y[:, None]).mean()
    return {"kl": float(kl), "agreement": float(agree), "prob_drop": float(drop)}


@dataclass
class Context:
    """One chain's analyses inputs, computed once.

    Attributes:
        chain (Chain), model (nn.Module): the chain and its original model (eval mode).
        graph (ModelGraph): the model's analysis at the chain's input shape.
        masked (nn.Module): ``chain.apply(model, graph)`` (a ScoredModel in hard mode).
        images (Tensor[N, C, H, W]): the chain's images on the model's device, in its dtype.
        p_logits, q_logits (Tensor[N, classes]): original and masked model on ``images``.
        predicted (Tensor[N]): the original model's classes (argmax of ``p_logits``).
        batch_size (int): rows per batched forward.
    """

    chain: Chain
    model: nn.Module
    graph: ModelGraph
    masked: nn.Module
    images: torch.Tensor
    p_logits: torch.Tensor
    q_logits: torch.Tensor
    predicted: torch.Tensor
    batch_size: int

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype


def to_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``model``'s device, in its float dtype."""
    device, dtype = model_device_dtype(model)
    return x.to(device=device, dtype=dtype)


def build_context(chain: Chain, model: nn.Module, images: torch.Tensor, *, masked: Optional[nn.Module] = None,
                  graph: Optional[ModelGraph] = None, batch_size: int = DEFAULT_BATCH) -> Context:
    """Checks the arguments every analysis takes and computes what they share.

    Args:
        chain (Chain): the chain to analyse.
        model (nn.Module): its original model (weights hashing to ``chain.model_hash``).
        images (Tensor[N, *chain.input_shape]): finite, floating point: the chain's images (or
            any images of its region).
        masked (nn.Module): ``chain.apply(model)`` when already built (default: built here).
        graph (ModelGraph): ``nchains.analyze(model, ...)`` at the chain's input shape.
        batch_size (int): rows per batched forward, in [1, 2**20].

    Raises:
        TypeError, ValueError: naming the argument.
    """
    if isinstance(chain, Context):
        return chain
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be an nchains.Chain, got {type(chain).__name__}")
    check_module(model)
    batch_size = check_batch_size(batch_size)
    images = check_images(images, chain.input_shape)
    if masked is not None:
        check_module(masked, "masked")
    graph = graph_for(model, chain.input_shape, graph)
    if masked is None:
        masked = chain.apply(model, graph)
    else:
        chain.check_model(model)
    images = to_model(model, images.detach())
    p_logits = logits_of(model, images, batch_size)
    q_logits = logits_of(masked, images, batch_size)
    return Context(chain, model, graph, masked.eval(), images, p_logits, q_logits, p_logits.argmax(1), batch_size)


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def check_number_list(name: str, values: Any, *, bound: str = "gt0", integer: bool = False,
                      low: int = 1, high: int = 10**6) -> list:
    """A non-empty list of finite numbers (``> 0`` or ``>= 0``), or ints in ``[low, high]``."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got the string {values!r}")
    if not isinstance(values, Sequence) or isinstance(values, torch.Tensor):
        try:
            values = list(values)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}") from None
    if not len(values):
        raise ValueError(f"{name} must hold at least one number, got an empty sequence")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            v = v.item()
        if integer:
            out.append(check_int(f"{name}[{i}]", v, low, high))
        else:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}[{i}] must be a number, got {v!r} ({type(v).__name__})")
            out.append(check_real(f"{name}[{i}]", v, bound))
    return out
