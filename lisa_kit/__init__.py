"""lisa_kit: reasoning segmentation assembled from swappable plugin components."""
from lisa_kit.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
