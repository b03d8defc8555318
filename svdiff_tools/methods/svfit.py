"""SVFit: train only the top-r singular values; the residual spectrum stays frozen.

``s = sigma_S + delta`` with ``delta`` (r,) trainable and zero at init, so ``M = diag(s - sigma_S) =
diag(delta)``. ``rank`` is an int (top r, default 16) or a float in (0, 1): per matrix, the fewest top
components whose energy reaches that fraction of ``||W||_F^2``.
"""

import torch

from .base import DiagonalDeltaMethod, register

DEFAULT_RANK = 16


@register
class SVFit(DiagonalDeltaMethod):
    name = "svfit"

    @classmethod
    def requested_rank(cls, config):
        return DEFAULT_RANK if config.rank is None else config.rank

    @property
    def singular_values(self) -> torch.Tensor:
        """The trained top-r singular values ``s = sigma_S + delta``."""
        return self.sigma + self.delta
