"""Step-wise sensitivity analysis (paper 3): step relevance, Tukey outliers, frequency ranking,
the dependency graph of relevant neurons, and its clustering across classes."""

from nchains.ssa.analysis import ssa
from nchains.ssa.dependency_graph import DependencyGraph

__all__ = ["DependencyGraph", "ssa"]
