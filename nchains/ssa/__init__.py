"""Step-wise sensitivity analysis (paper 3): step relevance, Tukey outliers, frequency ranking,
the dependency graph of relevant neurons, and its clustering across classes."""

from nchains.ssa.analysis import ssa
from nchains.ssa.clusters import SSAClusters, ssa_clusters
from nchains.ssa.dependency_graph import DependencyGraph
from nchains.ssa.render import render

__all__ = ["DependencyGraph", "SSAClusters", "render", "ssa", "ssa_clusters"]
