"""Pruning baselines of the sparse critical paths paper (Sec. 2.2): paths chosen by the pruning
objective instead of by neuron contributions.

- :func:`greedy_pruning` / :func:`greedy_paths` (:mod:`.greedy`): Algorithm 1, greedy removal
  of the lowest-relevance *live* neurons, re-ranked on the masked network after every step.
- :func:`dgr` / :func:`dgr_paths` (:mod:`.dgr`): distillation-guided routing (Wang et al.
  2018), L1-regularised continuous gates, binarised.

- :func:`evaluate_paths` (:mod:`.evaluate`): every path method of :mod:`.methods` on the same
  images, compared by dead-neuron prevalence, Jaccard overlap, LeRF and the sanity check
  (``nchains evaluate-paths``).

Both baselines return :class:`nchains.critical_paths.CriticalPath` (methods ``"greedy"``, ``"dgr"``), so
``.linear_model()``, ``.attribution()`` and the metrics of :mod:`nchains.metrics` apply to them
as to the contribution paths.
"""

from nchains.baselines.dgr import GRANULARITIES, dgr, dgr_paths
from nchains.baselines.evaluate import evaluate_paths
from nchains.baselines.greedy import GreedyStoppedEarly, greedy_paths, greedy_pruning
from nchains.baselines.methods import INPUT_METHODS, METHODS, PATH_METHODS, Settings

__all__ = ["GRANULARITIES", "GreedyStoppedEarly", "INPUT_METHODS", "METHODS", "PATH_METHODS", "Settings", "dgr",
           "dgr_paths", "evaluate_paths", "greedy_paths", "greedy_pruning"]
