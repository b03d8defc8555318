"""The methods; importing this package registers them in `REGISTRY` (the only list of methods)."""

from . import svdiff, svfit, svft, vectorfit  # noqa: F401  (registration)
from .base import REGISTRY, DiagonalDeltaMethod, SpectralMethod, method_class, register

METHODS = tuple(REGISTRY)

__all__ = ["METHODS", "REGISTRY", "SpectralMethod", "DiagonalDeltaMethod", "method_class", "register"]
