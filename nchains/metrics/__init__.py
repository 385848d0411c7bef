"""Metrics of critical paths and of attribution maps (paper 2, Sec. 2.4 and 3.3; Figs. 1, 2, 6, 7).

Paths are a :class:`nchains.critical_paths.CriticalPath` or a plain mapping site key ->
BoolTensor[*neuron shape]; attribution methods are callables ``(model, images, targets) ->
Tensor[N, C, H, W]`` (:mod:`.attributions` has baselines and adapters). One module per metric,
each with a plot function returning a matplotlib Figure (and writing a PNG when given a path):

- :mod:`.dead_neurons`: :func:`dead_neuron_prevalence`, :func:`plot_prevalence` (Fig. 1);
- :mod:`.jaccard`: :func:`jaccard`, :func:`jaccard_matrix`, :func:`plot_jaccard` (Fig. 2);
- :mod:`.degradation`: :func:`lerf`, :func:`morf`, :func:`plot_degradation` (Fig. 6a-c);
- :mod:`.roar`: :func:`roar`, :func:`plot_roar` (Fig. 6d; a long job: ``tools/bench_roar.py``);
- :mod:`.sanity`: :func:`randomisation_sanity`, :func:`plot_sanity` (Fig. 7), with :func:`ssim`.
"""

from nchains.metrics.attributions import (gradient, gradient_x_input, input_intgrad_attribution, path_attribution,
                                          random_attribution)
from nchains.metrics.dead_neurons import dead_neuron_prevalence, plot_prevalence
from nchains.metrics.degradation import DEFAULT_FRACTIONS, FILLS, lerf, morf, plot_degradation
from nchains.metrics.jaccard import jaccard, jaccard_matrix, plot_jaccard
from nchains.metrics.roar import DEFAULT_ROAR_FRACTIONS, plot_roar, removal_masks, roar, roar_cnn, train_classifier
from nchains.metrics.sanity import plot_sanity, randomisation_sanity, randomisable_layers
from nchains.metrics.ssim import ssim

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_ROAR_FRACTIONS", "FILLS", "dead_neuron_prevalence", "gradient",
           "gradient_x_input", "input_intgrad_attribution", "jaccard", "jaccard_matrix", "lerf", "morf",
           "path_attribution", "plot_degradation", "plot_jaccard", "plot_prevalence", "plot_roar", "plot_sanity",
           "random_attribution", "randomisable_layers", "randomisation_sanity", "removal_masks", "roar", "roar_cnn",
           "ssim", "train_classifier"]
