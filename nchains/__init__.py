"""nchains: local inference chains of CNNs, with a compiled C++/CUDA core.

Example:
    >>> import nchains
    >>> model = nchains.zoo.default_model()
    >>> images, labels, _ = nchains.zoo.default_images(["sneaker", "ankle-boot"], per_class=10)
    >>> chain = nchains.extract(model, images)
    >>> print(chain.describe())
"""

from nchains import baselines, metrics, ops
from nchains.models import zoo
from nchains.graph.analysis import ModelGraph, UnitDAG, analyze
from nchains.neurochains.chain import Chain
from nchains.compact.walk import compact
from nchains.neurochains.config import NeuroChainsConfig
from nchains.neurochains.extraction import extract
from nchains.neurochains.analyses import plot_analyses, run_analyses
from nchains.export.exporter import ExportError, export
from nchains.instrument.scored_model import ScoredModel
from nchains.contrib import Contributions, contributions
from nchains.critical_paths import CriticalPath, critical_path, critical_paths
from nchains.baselines import dgr, evaluate_paths, greedy_pruning
from nchains.ssa import DependencyGraph, ssa, ssa_clusters
from nchains.report.build import report  # the function; the sub-package stays importable by path
from nchains.distributed import run_batch, serve_export  # Ray itself is imported only when used

__version__ = "0.1.0"

__all__ = [
    # NeuroChains (paper 1), compact models and export
    "Chain", "ExportError", "NeuroChainsConfig", "ScoredModel", "compact", "export", "extract", "plot_analyses",
    "report", "run_analyses",
    # contributions and critical paths (paper 2), their baselines and metrics
    "Contributions", "CriticalPath", "baselines", "contributions", "critical_path", "critical_paths", "dgr",
    "evaluate_paths", "greedy_pruning", "metrics",
    # step-wise sensitivity analysis (paper 3)
    "DependencyGraph", "ssa", "ssa_clusters",
    # model analysis, ops, the shipped model, Ray
    "ModelGraph", "UnitDAG", "analyze", "ops", "run_batch", "serve_export", "zoo", "__version__",
]
