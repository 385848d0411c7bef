"""Rewrites of the traced graph: the scored model (scores, gates, fused residual tails) and
per-call taps of activations (for the contribution engine)."""

from nchains.instrument.scored_model import ScoredModel, fold_bn64
from nchains.instrument.taps import Site, sites, tap

__all__ = ["ScoredModel", "Site", "fold_bn64", "sites", "tap"]
