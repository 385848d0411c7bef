"""nchains: local inference chains of CNNs, with a compiled C++/CUDA core.

Example:
    >>> import nchains
    >>> model = nchains.zoo.default_model()
    >>> images, labels, _ = nchains.zoo.default_images(["sneaker", "ankle-boot"], per_class=10)
    >>> chain = nchains.extract(model, images)
    >>> print(chain.describe())
"""

from . import ops
from .analysis import ModelGraph, analyze
from .chain import Chain
from .compact import compact
from .config import NeuroChainsConfig
from .extract import extract
from .export import ExportError, export
from .scoring import ScoredModel

__version__ = "0.1.0"

__all__ = ["Chain", "ExportError", "ModelGraph", "NeuroChainsConfig", "ScoredModel", "analyze", "compact", "export",
           "extract", "ops", "__version__"]
