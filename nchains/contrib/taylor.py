"""Taylor contributions ``a · ∂Φ/∂a`` of every site from one forward and one backward.

The traced model is tapped at every site (:func:`nchains.instrument.taps.tap`: per call, the very
tensor the rest of the forward consumes). A gradient hook on each site's activation reduces
``a · ∂Φ/∂a`` with the compiled :func:`nchains.ops.taylor_contributions` as soon as the backward
reaches the site, so a site's gradient is freed right after (``torch.autograd.grad`` on all sites
would return, and hold, every gradient at once). The backward runs to the first site when
everything after it is computed from it alone (to the images otherwise); no weight gradient is
computed. Images are independent in eval mode, so the sum of Φ over the batch gives
per-image values.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from nchains.graph.analysis import ModelGraph
from nchains.instrument.taps import Site, tap
from nchains.ops import taylor_contributions

__all__ = ["check_logits", "target_logit", "taylor"]


def check_logits(out) -> torch.Tensor:
    """The model output when it is logits Tensor[N, K]; ValueError otherwise."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must return logits Tensor[N, K] (pre-softmax), got {what}")
    return out


def target_logit(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Tensor[R]: ``logits[r, target[r]]``."""
    return logits.gather(1, target[:, None])[:, 0]


def _zeros(site: Site, n: int, reduction: str, like: torch.Tensor) -> torch.Tensor:
    """The contribution of a site the target does not depend on."""
    shape = (n, *site.shape[1:]) if reduction == "none" or len(site.shape) <= 2 else (n, site.shape[1])
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _first_cut(graph: ModelGraph, chosen: Sequence[Site]) -> Optional[Site]:
    """The first site when every other site and the output are computed from it alone (nothing
    computed from the images before it is read after it: no skip around it); else None.

    The backward can then stop at that site instead of running on to the images (it skips the
    data gradient of the layers below it)."""
    if not chosen:
        return None
    order = {n: i for i, n in enumerate(graph.graph_module.graph.nodes)}
    first = min(chosen, key=lambda s: order[s.node])
    nodes = list(graph.graph_module.graph.nodes)
    down, from_images = {first.node}, set(graph.graph_module.graph.find_nodes(op="placeholder"))
    for node in nodes:
        if node in down or any(a in down for a in node.all_input_nodes):
            down.add(node)
        if any(a in from_images for a in node.all_input_nodes):
            from_images.add(node)
    output = nodes[-1]
    for node in down:
        if node is not first.node and any(a in from_images and a not in down for a in node.all_input_nodes):
            return None
    if output not in down or any(s.node not in down for s in chosen):
        return None
    return first


def taylor(graph: ModelGraph, chosen: Sequence[Site], images: torch.Tensor, target: Callable[[torch.Tensor],
           torch.Tensor], reduction: str, absolute: bool, bar) -> Tuple[Dict[str, torch.Tensor], torch.Tensor,
                                                                    torch.Tensor]:
    """``a · ∂Φ/∂a`` at every site of ``chosen``.

    Args:
        graph (ModelGraph): the model's analysis.
        chosen (sequence of Site): the sites.
        images (Tensor[N, *input_shape]): on the model's device, in its dtype.
        target (callable): logits Tensor[N, K] -> LongTensor[N] (resolves and checks the target).
        reduction (str): ``"channel"`` (Tensor[N, C]) or ``"none"`` (the activation's shape).
        absolute (bool): ``|a · ∂Φ/∂a|`` per neuron (before the channel sum).
        bar: a tqdm bar, advanced once per site reached by the backward.

    Returns:
        (dict key -> Tensor, in the order of ``chosen``; logits Tensor[N, K]; target LongTensor[N]).
    """
    tapped = tap(graph, chosen)
    found: Dict[str, torch.Tensor] = {}

    def hook_for(key: str, a: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            found[key] = taylor_contributions(a.detach(), grad, reduction=reduction, absolute=absolute)
            bar.update(1)
        return hook

    cut = _first_cut(graph, chosen)
    x = images.detach().clone().requires_grad_(True)  # frozen weights: the sites still need a graph
    with torch.enable_grad():
        logits, values = tapped(x)
        logits = check_logits(logits)
        t = target(logits)
        handles: List = [v.register_hook(hook_for(k, v)) for k, v in values.items() if v.requires_grad]
        phi = target_logit(logits, t).sum()
        stop = values[cut.key] if cut is not None else x
        if phi.requires_grad and stop.requires_grad:
            torch.autograd.grad(phi, [stop], allow_unused=True)  # the hooks keep what is needed
    for h in handles:
        h.remove()
    del values
    out = {s.key: found.get(s.key) if s.key in found else _zeros(s, len(images), reduction, logits)
           for s in chosen}
    return out, logits.detach(), t
