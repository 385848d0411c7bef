"""Model analysis: the one traced, shape-propagated view of a CNN that everything is built from.

:func:`analyze` returns a :class:`ModelGraph`: filter units (conv + folded BN + activation),
linears, residual adds, concats, gateable regions, the papers' labels and the unit DAG.
"""

from nchains.graph.analysis import (ChannelConcat, ConvUnit, LinearUnit, ModelGraph, Region, ResidualAdd,
                                    UnitDAG, analyze, classify, is_tensor, shape_of)

__all__ = ["ChannelConcat", "ConvUnit", "LinearUnit", "ModelGraph", "Region", "ResidualAdd", "UnitDAG",
           "analyze", "classify", "is_tensor", "shape_of"]
