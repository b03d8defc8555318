"""`SVDAdapterConfig`: what to adapt and how. Field names equal the trainer's flag names."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import SVDConfigError
from .methods import all_options, method_class
from .methods.svft import PATTERNS as SVFT_PATTERNS  # noqa: F401  (the names this module has always had)
from .methods.vectorfit import AVF_METRICS  # noqa: F401

SVD_DRIVERS = ("auto", "gram", "full", "randomized")
SVD_DTYPES = ("float32", "float64")
FORWARD_MODES = ("auto", "recompose", "factored")
BASIS_STORAGE = ("auto", "one_sided", "both")


def check_scale(value: Any, what: str = "scale") -> float:
    """``value`` as a finite float, or an `SVDConfigError` in one sentence (NaN, inf, strings, bools)."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise SVDConfigError(f"{what}={value!r} must be a finite number such as 1.0 or 0.5.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SVDConfigError(f"{what}={value!r} must be a finite number such as 1.0 or 0.5.") from None
    if not math.isfinite(number):
        raise SVDConfigError(f"{what}={value!r} must be a finite number such as 1.0 or 0.5.")
    return number


@dataclass(init=False)
class SVDAdapterConfig:
    """Configuration of one spectral adapter.

    Every method computes ``W' = W + scale * U_S M V_S^T`` from the thin SVD ``W = U diag(sigma) V^T``
    of each targeted weight (conv kernels flattened to ``out x in*kh*kw``).

    method:          a registered method: "svdiff" | "svfit" | "svft" | "vectorfit" (`methods.REGISTRY`).
    rank:            components S. ``None`` = every (numerically non-zero) component. An int r = the top r
                     (svfit, svft). A float in (0, 1) = per matrix, the fewest top components whose energy
                     sum(sigma_i^2) reaches that fraction of ||W||_F^2 (svfit).
    target_modules:  PEFT semantics: a list matches a module whose name equals an entry or ends with
                     "." + entry; a string is a full-regex match, or a preset name (see `targets.PRESETS`).
    exclude_modules: same semantics; matching modules are skipped.
    scale:           the adapter's weight in the sum of adapters (LoRA's "adapter weight").
    method options:  each method's own settings, declared once in its class (`methods.Option`) and given here
                     as keywords: SVFT's ``svft_pattern`` / ``svft_offset`` / ``svft_seed`` (the sparsity pattern
                     of M: plain = diagonal; banded with offset d has k(2d+1) - d(d+1) entries; random and top_k
                     use that count), VectorFit's ``avf_k`` / ``avf_interval`` / ``avf_metric`` (Adaptive Vector
                     Freezing; 0 disables it). They live in ``options`` and read as attributes
                     (``config.svft_offset``); an option left out takes its declared default.
    train_bias:      train an additive bias delta on every adapted layer (default: only vectorfit).
    train_norms:     SVDiff's recipe: also train an additive delta on LayerNorm/GroupNorm weights.
    svd_driver:      "auto" (randomised for top-r when r <= k/4, else gram), "gram" (float64 eigh of the
                     smaller Gram matrix), "full" (LAPACK/cuSOLVER SVD), "randomized".
    svd_dtype:       precision of the stored factors and of the "full"/"randomized" routes ("float32" or
                     "float64"), whatever the model dtype; the Gram route always computes in float64.
    forward_mode:    "auto" (per call by flop count), "recompose" (W + delta), "factored" (x V M^T U^T).
    basis_storage:   how full-spectrum methods store U and V. "one_sided": keep the smaller factor and, of
                     the larger one, only the ill-conditioned tail; the rest is derived from W (recomposed:
                     min/max(out, in) more flops; factored: read from the base output when out <= in, added
                     to the base op's input when out > in). "auto": one-sided where out * in >= 2**18 and both
                     paths stay available (not for convolutions wider than 1x1 with out > in), else both
                     factors. "both": keep U and V (each as large as W when W is square).
    """

    method: str = "svdiff"
    rank: Optional[Union[int, float]] = None
    target_modules: Optional[Union[str, list]] = None
    exclude_modules: Optional[Union[str, list]] = None
    scale: float = 1.0
    train_bias: Optional[bool] = None
    train_norms: bool = False
    svd_driver: str = "auto"
    svd_dtype: str = "float32"
    forward_mode: str = "auto"
    basis_storage: str = "auto"
    extra: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # method options by name (`methods.Option`), defaults filled in

    def __init__(self, method: str = "svdiff", rank: Optional[Union[int, float]] = None,
                 target_modules: Optional[Union[str, list]] = None, exclude_modules: Optional[Union[str, list]] = None,
                 scale: float = 1.0, train_bias: Optional[bool] = None, train_norms: bool = False,
                 svd_driver: str = "auto", svd_dtype: str = "float32", forward_mode: str = "auto",
                 basis_storage: str = "auto", extra: Optional[dict] = None, options: Optional[dict] = None,
                 **method_options: Any) -> None:
        self.method, self.rank, self.target_modules, self.exclude_modules = method, rank, target_modules, \
            exclude_modules
        self.scale, self.train_bias, self.train_norms = scale, train_bias, train_norms
        self.svd_driver, self.svd_dtype, self.forward_mode, self.basis_storage = svd_driver, svd_dtype, \
            forward_mode, basis_storage
        self.extra = dict(extra or {})
        given = {**(options or {}), **method_options}
        known = all_options()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise SVDConfigError(f"{', '.join(unknown)}: no registered method has such an option; the methods' "
                                 f"options are {', '.join(known)}.")
        self.options = {name: given.get(name, option.default) for name, option in known.items()}
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """A method option as an attribute (``config.svft_offset``); one registered after this config was made
        reads as its default."""
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        option = all_options().get(name)
        if option is not None:
            return option.default
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def choice(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise SVDConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}.")

        self.scale = check_scale(self.scale, "scale")
        method = method_class(self.method) if isinstance(self.method, str) else method_class(repr(self.method))
        choice("svd_driver", self.svd_driver, SVD_DRIVERS)
        choice("svd_dtype", self.svd_dtype, SVD_DTYPES)
        choice("forward_mode", self.forward_mode, FORWARD_MODES)
        choice("basis_storage", self.basis_storage, BASIS_STORAGE)
        rank = self.rank
        if isinstance(rank, bool) or not (rank is None or isinstance(rank, (int, float))):
            raise SVDConfigError(f"rank={rank!r} must be None, a positive int or a float in (0, 1).")
        if isinstance(rank, float):
            if rank.is_integer() and rank >= 1:
                self.rank = rank = int(rank)
            elif not 0.0 < rank < 1.0:
                raise SVDConfigError(f"rank={rank!r}: a float rank is an energy fraction and must lie in (0, 1).")
        if isinstance(rank, int) and rank < 1:
            raise SVDConfigError(f"rank={rank} must be at least 1 (or None for every component).")
        for name, option in all_options().items():
            option.check(getattr(self, name))
        method.validate_config(self)

    # ------------------------------------------------------------------ derived
    @property
    def method_class(self) -> type:
        return method_class(self.method)

    @property
    def trains_bias(self) -> bool:
        return self.method_class.trains_bias_by_default if self.train_bias is None else bool(self.train_bias)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """The fields and every registered method option, flat (the adapter file's ``config``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        out.update({name: getattr(self, name) for name in all_options()})
        return copy.deepcopy(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SVDAdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)} | set(all_options())
        unknown = sorted(set(data) - known)
        if unknown:
            raise SVDConfigError(
                f"config fields {unknown} are unknown to this svdiff-tools version; upgrade svdiff-tools."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "SVDAdapterConfig":
        """A copy with ``changes`` (fields or method options)."""
        return type(self).from_dict({**self.to_dict(), **changes})
