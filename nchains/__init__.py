"""nchains: local inference chains of CNNs, with a compiled C++/CUDA core."""

from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
