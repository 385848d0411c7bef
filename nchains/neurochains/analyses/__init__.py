"""The NeuroChains paper's analyses of a chain (section 4.2 and the appendix), each a function
returning plain data plus a plot function (a matplotlib Figure):

- :func:`fidelity_vs_size` / :func:`plot_fidelity`: chains at several ``lam``, size vs fidelity;
- :func:`faithfulness` / :func:`plot_faithfulness`: the damage of removing each kept filter;
- :func:`quotient` / :func:`plot_quotient`: the quotient metric Q(p, q) of Eq. 9;
- :func:`stability` / :func:`plot_stability`: test fidelity on nearest held-out images;
- :func:`robustness` / :func:`plot_robustness`: FGSM and PGD;
- :func:`magnitude_baseline` / :func:`plot_magnitude`: a weight-norm chain of the same size.

:func:`run_analyses` runs a set of them and returns one JSON-serialisable dict;
:func:`plot_analyses` writes a PNG per analysis; :func:`summary_lines` says the results in one
line per analysis.
"""

from nchains.neurochains.analyses.faithfulness import faithfulness, plot_faithfulness
from nchains.neurochains.analyses.fidelity import fidelity_vs_size, plot_fidelity
from nchains.neurochains.analyses.magnitude import magnitude_baseline, plot_magnitude
from nchains.neurochains.analyses.quotient import plot_quotient, quotient
from nchains.neurochains.analyses.robustness import fgsm, pgd, plot_robustness, robustness
from nchains.neurochains.analyses.run import ANALYSES, DEFAULT_ANALYSES, figures, plot_analyses, run_analyses
from nchains.neurochains.analyses.stability import plot_stability, stability
from nchains.neurochains.analyses.summary import summary_lines

__all__ = ["ANALYSES", "DEFAULT_ANALYSES", "faithfulness", "fgsm", "fidelity_vs_size", "figures",
           "magnitude_baseline", "pgd", "plot_analyses", "plot_faithfulness", "plot_fidelity", "plot_magnitude",
           "plot_quotient", "plot_robustness", "plot_stability", "quotient", "robustness", "run_analyses",
           "stability", "summary_lines"]
