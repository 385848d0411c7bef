"""The result of :func:`nchains.contributions`: a Mapping site key -> Tensor, in execution order."""

from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from nchains.instrument.taps import Site

__all__ = ["Contributions"]


class Contributions(Mapping):
    """Contributions of the neurons (or channels) of every requested site to the target logit.

    ``c[key]`` is Tensor[N, C] for ``unit="channel"`` (summed over space; ``[N, F]`` for a flat
    site) and the site's activation shape ``[N, C, H, W]`` / ``[N, F]`` for ``unit="neuron"``.
    Iteration follows the execution order of the sites.

    Attributes:
        sites (list[Site]): the sites, in execution order (``key``, ``module``, ``call``,
            ``label``, ``shape``).
        target (LongTensor[N]): the class of the explained logit Φ, per image.
        logits (Tensor[N, K]): the original model's outputs.
        method (str): ``"taylor"``, ``"intgrad"`` or ``"ablation"``.
        unit (str): ``"channel"`` or ``"neuron"``.
        absolute (bool): whether values are ``|·|`` per neuron (before the channel sum).
        delta (dict key -> Tensor[N] or None): intgrad's completeness error per site and image,
            ``Σ C − (Φ(x) − Φ(x; a = 0))`` (signed sums, whatever ``absolute``); None otherwise.
    """

    def __init__(self, values: Mapping[str, torch.Tensor], sites: Sequence[Site], target: torch.Tensor,
                 logits: torch.Tensor, method: str, unit: str, absolute: bool,
                 delta: Optional[Mapping[str, torch.Tensor]] = None):
        keys = [s.key for s in sites]
        if list(values) != keys:
            raise ValueError(f"values must have one entry per site, in the sites' order; got keys "
                             f"{list(values)[:3]}… for sites {keys[:3]}…")
        self._values: Dict[str, torch.Tensor] = dict(values)
        self.sites: List[Site] = list(sites)
        self.target = target
        self.logits = logits
        self.method = method
        self.unit = unit
        self.absolute = bool(absolute)
        self.delta = None if delta is None else dict(delta)

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._values[key]
        except KeyError:
            shown = ", ".join(list(self._values)[:4])
            raise KeyError(f"{key!r} is not a site of these contributions (sites: {shown}, …)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return (f"Contributions(method={self.method!r}, unit={self.unit!r}, absolute={self.absolute}, "
                f"sites={len(self)}, images={len(self.target)})")

    def channel_values(self, key: str) -> torch.Tensor:
        """Tensor[N, C]: the site's contributions per channel (neuron values summed over space)."""
        v = self[key]
        return v.flatten(2).sum(2) if self.unit == "neuron" and v.dim() > 2 else v

    def top(self, key: str, k: int = 5) -> List[Tuple[int, float]]:
        """The ``k`` channels of site ``key`` with the largest contribution averaged over the
        images, as ``(channel index, value)``, largest first (ties: lower index first)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        mean = self.channel_values(key).detach().double().mean(0).cpu()
        order = sorted(range(len(mean)), key=lambda i: (-float(mean[i]), i))[:k]
        return [(i, float(mean[i])) for i in order]
