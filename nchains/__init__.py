"""nchains: local inference chains of CNNs, with a compiled C++/CUDA core.

Example:
    >>> import nchains
    >>> model = nchains.zoo.default_model()
    >>> images, labels, _ = nchains.zoo.default_images(["sneaker", "ankle-boot"], per_class=10)
    >>> chain = nchains.extract(model, images)
    >>> print(chain.describe())
"""

from nchains import metrics, ops
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
from nchains.report.build import report  # the function; the sub-package stays importable by path
from nchains import baselines
from nchains.baselines import dgr, evaluate_paths, greedy_pruning
from nchains.distributed import run_batch, serve_export
from nchains.ssa import DependencyGraph, ssa, ssa_clusters

__version__ = "0.1.0"

__all__ = ["baselines", "dgr", "evaluate_paths", "greedy_pruning", "Chain", "Contributions", "CriticalPath", "DependencyGraph", "ExportError", "ModelGraph", "NeuroChainsConfig", "ScoredModel", "UnitDAG",
           "analyze", "compact", "contributions", "critical_path", "critical_paths", "export", "extract", "metrics", "ops", "plot_analyses", "report", "run_analyses", "run_batch", "serve_export", "ssa", "ssa_clusters", "zoo", "__version__"]
