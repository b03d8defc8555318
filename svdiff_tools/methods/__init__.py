"""The methods; importing this package registers them in `REGISTRY` (the only list of methods)."""

from . import svdiff, svfit, svft, vectorfit  # noqa: F401  (registration)
from .base import (ON_REGISTER, REGISTRY, DiagonalDeltaMethod, Option, SpectralMethod, add_option_flags, all_options,
                   method_class, option_values, register, unregister)

METHODS = tuple(REGISTRY)  # the built-in methods; `REGISTRY` also holds those registered later

__all__ = ["METHODS", "ON_REGISTER", "REGISTRY", "Option", "SpectralMethod", "DiagonalDeltaMethod", "add_option_flags",
           "all_options", "method_class", "option_values", "register", "unregister"]
