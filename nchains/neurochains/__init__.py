"""NeuroChains (paper 1): the configuration, the extraction and the Chain artifact."""

from nchains.neurochains.chain import Chain
from nchains.neurochains.config import NeuroChainsConfig
from nchains.neurochains.extraction import extract, model_family

__all__ = ["Chain", "NeuroChainsConfig", "extract", "model_family"]
