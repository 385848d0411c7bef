"""Contributions of neurons and channels to a target logit, for every layer of a network at once.

:func:`contributions` computes batched Taylor contributions (``a · ∂Φ/∂a``, one forward and one
backward for all sites), neuron integrated gradients with zero baseline (prefix once, batched
suffix re-runs) and exact channel ablation, per *call* of each activation (or unit), and returns
a :class:`Contributions` mapping. The critical-path method (:mod:`nchains.critical_paths`) and
step-wise sensitivity analysis build on it.
"""

from nchains.contrib.engine import METHODS, UNITS, contributions
from nchains.contrib.result import Contributions
from nchains.contrib.targets import resolve_targets

__all__ = ["Contributions", "METHODS", "UNITS", "contributions", "resolve_targets"]
