"""The compact sub-network of a chain: pruned filters removed, plain PyTorch ops only.

:mod:`.walk` walks the graph (channel-preserving ops, adds, concats, reshapes), :mod:`.units`
emits conv and linear units, :mod:`.emit` holds the channel state and graph-writing primitives.
"""

from nchains.compact.walk import compact

__all__ = ["compact"]
