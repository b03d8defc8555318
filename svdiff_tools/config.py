"""`SVDAdapterConfig`: what to adapt and how. Field names equal the trainer's flag names."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import SVDConfigError
from .methods import method_class

SVFT_PATTERNS = ("plain", "banded", "random", "top_k")
AVF_METRICS = ("mean_abs", "rms", "max_abs")
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


@dataclass
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
    svft_pattern / svft_offset / svft_seed: SVFT's sparsity pattern of M (plain = diagonal; banded with
                     offset d has k(2d+1) - d(d+1) entries; random and top_k use that same count).
    avf_k / avf_interval / avf_metric: VectorFit's Adaptive Vector Freezing (0 disables it).
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
    svft_pattern: str = "banded"
    svft_offset: int = 2
    svft_seed: int = 0
    avf_k: int = 0
    avf_interval: int = 50
    avf_metric: str = "mean_abs"
    train_bias: Optional[bool] = None
    train_norms: bool = False
    svd_driver: str = "auto"
    svd_dtype: str = "float32"
    forward_mode: str = "auto"
    basis_storage: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def choice(name: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise SVDConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}.")

        self.scale = check_scale(self.scale, "scale")
        method = method_class(self.method) if isinstance(self.method, str) else method_class(repr(self.method))
        choice("svft_pattern", self.svft_pattern, SVFT_PATTERNS)
        choice("avf_metric", self.avf_metric, AVF_METRICS)
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
        for name in ("svft_offset", "svft_seed", "avf_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SVDConfigError(f"{name}={value!r} must be a non-negative int.")
        if not isinstance(self.avf_interval, int) or self.avf_interval < 1:
            raise SVDConfigError(f"avf_interval={self.avf_interval!r} must be a positive int.")
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
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "SVDAdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SVDConfigError(
                f"config fields {unknown} are unknown to this svdiff-tools version; upgrade svdiff-tools."
            )
        return cls(**data)

    def replace(self, **changes: Any) -> "SVDAdapterConfig":
        return dataclasses.replace(self, **changes)
