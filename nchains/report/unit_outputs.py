"""The outputs of chosen units of a chain's masked model (``chain.apply(model)``) in one forward.

The masked model (:class:`~nchains.instrument.scored_model.ScoredModel`) runs every conv unit
*call* as a module of its own (``masked.unit(name)``, names keyed per call like the sites of
:mod:`nchains.instrument.taps`), so a forward hook on it sees exactly one call: no per-module
ambiguity. Once the last wanted unit has run the forward is cut short (nothing after it is
needed), which makes activation maximisation of early layers cheap.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

__all__ = ["computed_layers", "unit_outputs"]


class _Enough(Exception):
    """Raised by the last hook to stop the forward."""


def computed_layers(chain) -> List[str]:
    """The conv layers the chain runs, in graph order: at least one kept filter and not inside
    a removed region (those are never computed: the identity replaces them)."""
    removed = {layer for region, info in chain.regions.items() if not chain.gates.get(region, 1)
               for layer in info.get("layers", [])}
    return [name for name, idx in chain.kept.items() if idx and name not in removed]


def unit_outputs(masked, layers: Sequence[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``{layer: Tensor[N, C_out, H, W]}``: each unit's output (after its activation) on ``x``
    in the masked model, with autograd history when grad mode is on.

    Args:
        masked (ScoredModel): the chain's masked model (hard mode).
        layers (sequence of str): units among :func:`computed_layers` of the chain.
        x (Tensor[N, C, H, W]): inputs on the model's device, in its dtype.
    """
    wanted = list(dict.fromkeys(layers))
    got: Dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module, inputs, out):
            got[name] = out
            if len(got) == len(wanted):
                raise _Enough
        return fn

    for name in wanted:
        handles.append(masked.unit(name).register_forward_hook(hook(name)))
    try:
        masked(x)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in wanted if n not in got]
    if missing:
        raise ValueError(f"layers {missing[:3]} did not run in the masked model (removed by the chain?)")
    return got

