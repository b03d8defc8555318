"""The four methods; importing this package registers them in `REGISTRY`."""

from . import svdiff, svfit, svft, vectorfit  # noqa: F401  (registration)
from .base import REGISTRY, DiagonalDeltaMethod, SpectralMethod, method_class, register

__all__ = ["REGISTRY", "SpectralMethod", "DiagonalDeltaMethod", "method_class", "register"]
