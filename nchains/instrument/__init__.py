"""Rewrites of the traced graph: the scored model (scores, gates, fused residual tails)."""

from nchains.instrument.scored_model import ScoredModel, fold_bn64

__all__ = ["ScoredModel", "fold_bn64"]
