"""Rewrites of the traced graph: the scored model (scores, gates, fused residual tails) and
per-call taps of activations (for the contribution engine), and the self-checks that compare
a scored or compact model with what it must reproduce."""

from nchains.instrument.scored_model import ScoredModel, fold_bn64
from nchains.instrument.self_check import check_compact, check_scored
from nchains.instrument.taps import Site, sites, tap

__all__ = ["ScoredModel", "Site", "check_compact", "check_scored", "fold_bn64", "sites", "tap"]
