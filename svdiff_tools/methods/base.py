"""The method interface: a small module that owns its trainable tensors and builds the middle matrix M.

Every method adapts ``W' = W + scale * U_S M V_S^T`` (+ ``scale * bias_delta`` when it trains biases),
with ``U_S`` (out x r), ``V_S`` (in x r) fixed and ``M`` (r x r) built from the trainable tensors. All
trainable tensors are *deltas* that start at zero, so ``M = 0`` at initialisation and weight decay pulls
toward the base model, never toward zero singular values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import SVDConfigError

SVDAdapterConfig = Any  # an svdiff_tools.config.SVDAdapterConfig, passed in (methods sit below config)

REGISTRY: Dict[str, type] = {}
ON_REGISTER: List[Callable[[type, bool], None]] = []  # (method, True) on register, (method, False) on unregister


@dataclass(frozen=True)
class Option:
    """One option of a method, declared once in its class (``options``): it becomes the `SVDAdapterConfig` field
    ``name``, the trainer's flag ``--name`` and the PEFT config's field, with this default and help. ``kind``: int,
    float or str; ``choices``: the allowed values; ``minimum``: the least allowed number."""

    name: str
    kind: type
    default: Any
    help: str
    choices: Tuple = ()
    minimum: Optional[float] = None

    def check(self, value: Any) -> None:
        """Raise `SVDConfigError` in one sentence for a value this option does not take."""
        if self.choices:
            if value not in self.choices:
                raise SVDConfigError(f"{self.name}={value!r} is not supported; choose one of "
                                     f"{', '.join(map(str, self.choices))}.")
            return
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)
                                 or (self.minimum is not None and value < self.minimum)):
            what = {0: "a non-negative int", 1: "a positive int"}.get(self.minimum, f"an int >= {self.minimum}")
            raise SVDConfigError(f"{self.name}={value!r} must be {what}.")
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or value != value or abs(value) == float("inf")
                                   or (self.minimum is not None and value < self.minimum)):
            bound = "" if self.minimum is None else f" >= {self.minimum:g}"
            raise SVDConfigError(f"{self.name}={value!r} must be a finite number{bound}.")
        if self.kind is str and not isinstance(value, str):
            raise SVDConfigError(f"{self.name}={value!r} must be a string.")


def all_options() -> Dict[str, Option]:
    """Every registered method's options by name, in registration order (a name shared by two methods is one
    option: `register` refuses two different declarations of it)."""
    return {o.name: o for cls in REGISTRY.values() for o in cls.options}


def add_option_flags(parser) -> None:
    """Every registered method's options as ``--name`` flags of an argparse parser (or argument group)."""
    for o in all_options().values():
        parser.add_argument(f"--{o.name}", type=o.kind, default=o.default, choices=o.choices or None, help=o.help)


def option_values(namespace) -> Dict[str, Any]:
    """The method options' values from parsed flags (`add_option_flags`), by name."""
    return {name: getattr(namespace, name) for name in all_options() if hasattr(namespace, name)}


def register(cls: type) -> type:
    """Class decorator: make a `SpectralMethod` subclass available under ``cls.name`` everywhere (config
    validation and fields, files, the trainer's ``--method`` choices, flags and default learning rates, PEFT)."""
    known = all_options()
    for option in cls.options:
        if option.name in known and known[option.name] != option:
            raise SVDConfigError(f"method {cls.name!r} declares option {option.name!r} differently from a method "
                                 "registered before it; give it another name.")
    REGISTRY[cls.name] = cls
    for hook in ON_REGISTER:
        hook(cls, True)
    return cls


def unregister(name: str) -> None:
    """Take a method out of the registry again (a method defined for a while, e.g. in a test)."""
    cls = REGISTRY.pop(name, None)
    if cls is not None:
        for hook in ON_REGISTER:
            hook(cls, False)


def method_class(name: str) -> type:
    if name not in REGISTRY:
        raise SVDConfigError(f"method={name!r} is not supported; choose one of {', '.join(REGISTRY)}.")
    return REGISTRY[name]


class SpectralMethod(nn.Module):
    """Base class. Subclasses set ``name`` and implement `diag_values` (diagonal M) or override
    `mul_right` and `dense` (general sparse M). Class attributes state everything the rest of the library
    asks about a method: which ranks it takes, its default learning rate and where that comes from, whether it
    trains biases and Adaptive Vector Freezing by default, and its own options (`Option`), from which the config
    fields, the trainer's flags and the PEFT config are made."""

    name: ClassVar[str] = ""
    diagonal: ClassVar[bool] = True
    rank_forms: ClassVar[Tuple[str, ...]] = ()  # "top_r" (an int), "energy" (a float in (0, 1)); () = every one
    default_rank: ClassVar[Optional[int]] = None  # when rank is None: None = every component
    default_lr: ClassVar[float] = 1e-3
    lr_source: ClassVar[str] = ""
    trains_bias_by_default: ClassVar[bool] = False
    supports_avf: ClassVar[bool] = False  # VectorFit's Adaptive Vector Freezing
    options: ClassVar[Tuple[Option, ...]] = ()  # this method's own settings, declared once (see `Option`)

    def __init__(self, sigma: torch.Tensor, config: SVDAdapterConfig, out_features: Optional[int],
                 U: Optional[torch.Tensor] = None, V: Optional[torch.Tensor] = None):
        """sigma (r,): the adapted singular values; out_features: size of a bias delta (None: the layer has
        no bias slot, e.g. an Embedding); U (out x r), V (in x r): the basis, for patterns that need it."""
        super().__init__()
        self.rank = int(sigma.shape[0])
        self.register_buffer("sigma", sigma.detach().to(torch.float32).clone(), persistent=False)
        if config.trains_bias and out_features is not None:
            self.bias_delta = nn.Parameter(torch.zeros(out_features))
        else:
            self.bias_delta = None

    # --- configuration -------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: SVDAdapterConfig) -> None:
        """Raise `SVDConfigError` for settings this method cannot take (``config.rank`` is already an int,
        a float in (0, 1) or None)."""
        rank = config.rank
        if rank is not None and not cls.rank_forms:
            raise SVDConfigError(f"{cls.name} trains every singular value, so rank must be None; use "
                                 f"{' or '.join(n for n, c in REGISTRY.items() if 'top_r' in c.rank_forms)} for top-r.")
        if isinstance(rank, float) and "energy" not in cls.rank_forms:
            raise SVDConfigError(f"{cls.name} takes an int rank (top r) or None; energy fractions are for "
                                 f"{', '.join(n for n, c in REGISTRY.items() if 'energy' in c.rank_forms)}.")
        if config.avf_k and not cls.supports_avf:
            raise SVDConfigError(f"avf_k (Adaptive Vector Freezing) belongs to method="
                                 f"{next((n for n, c in REGISTRY.items() if c.supports_avf), 'vectorfit')!r}.")

    @classmethod
    def learning_rate(cls, config: SVDAdapterConfig) -> float:
        """The default learning rate for this configuration (see ``lr_source``)."""
        return cls.default_lr

    @classmethod
    def trainable_count(cls, rank: int, out_features: Optional[int], config: SVDAdapterConfig) -> int:
        """Trainable elements of one layer at ``rank`` components (``out_features``: its bias size, None without
        a bias slot); the estimator counts with it, without building anything."""
        bias = out_features if (config.trains_bias and out_features is not None) else 0
        return rank + bias

    # --- which components ---------------------------------------------------------------
    @classmethod
    def requested_rank(cls, config: SVDAdapterConfig) -> Optional[Union[int, float]]:
        """None = every component; int = top r; float = energy fraction (svfit)."""
        return cls.default_rank if config.rank is None else config.rank

    @classmethod
    def needs_factors(cls, config: SVDAdapterConfig) -> bool:
        """Whether ``__init__`` reads the basis ``U``, ``V`` (e.g. to choose a sparsity pattern)."""
        return False

    # --- M --------------------------------------------------------------------------------
    def diag_values(self) -> torch.Tensor:
        """The diagonal of M, shape (r,), for diagonal methods."""
        raise NotImplementedError

    def mul_right(self, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``X @ M`` (``X @ M^T`` with ``transpose``) for ``X`` (..., r)."""
        return X * self.diag_values().to(X.dtype)

    def dense(self) -> torch.Tensor:
        """M as a dense (r x r) float32 matrix."""
        return torch.diag(self.diag_values().float())

    def bias(self) -> Optional[torch.Tensor]:
        return self.bias_delta

    def state_problem(self, state: Mapping[str, torch.Tensor]) -> Optional[str]:
        """What is wrong with a state dict read from a file for this module (beyond names, shapes, dtypes and
        finiteness, which the loader checks for every method), or None."""
        return None

    # --- Adaptive Vector Freezing ----------------------------------------------------------
    def vectors(self) -> Dict[str, nn.Parameter]:
        """Named trainable vectors (VectorFit's unit of freezing)."""
        return {n: p for n, p in self.named_parameters(recurse=False) if p is not None}


class DiagonalDeltaMethod(SpectralMethod):
    """A diagonal method whose trainable tensor is ``delta`` (r,), zero at init; ``M = diag(delta)``."""

    def __init__(self, sigma, config, out_features, U=None, V=None):
        super().__init__(sigma, config, out_features)
        self.delta = nn.Parameter(torch.zeros(self.rank))

    def diag_values(self) -> torch.Tensor:
        return self.delta
