"""memfit: train bigger PyTorch models in the memory you have."""

from . import codec

__version__ = "0.1.0"
__all__ = ["codec", "__version__"]
