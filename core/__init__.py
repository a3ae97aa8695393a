"""darkspec: the reference specification and conformance suite for Darknet's feature-fusion layers."""

from darkspec.errors import DarkspecError

__version__ = "0.1.0"
__all__ = ["DarkspecError", "__version__"]
