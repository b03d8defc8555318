"""The method interface: a small module that owns its trainable tensors and builds the middle matrix M.

Every method adapts ``W' = W + scale * U_S M V_S^T`` (+ ``scale * bias_delta`` when it trains biases),
with ``U_S`` (out x r), ``V_S`` (in x r) fixed and ``M`` (r x r) built from the trainable tensors. All
trainable tensors are *deltas* that start at zero, so ``M = 0`` at initialisation and weight decay pulls
toward the base model, never toward zero singular values.
"""

from __future__ import annotations

from typing import ClassVar, Dict, Optional, Union

import torch
from torch import nn

from ..config import SVDAdapterConfig

REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type:
    return REGISTRY[name]


class SpectralMethod(nn.Module):
    """Base class. Subclasses set ``name`` and implement `diag_values` (diagonal M) or override
    `mul_right` and `dense` (general sparse M)."""

    name: ClassVar[str] = ""
    diagonal: ClassVar[bool] = True

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

    # --- which components ---------------------------------------------------------------
    @classmethod
    def requested_rank(cls, config: SVDAdapterConfig) -> Optional[Union[int, float]]:
        """None = every component; int = top r; float = energy fraction (svfit)."""
        return config.rank

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
