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
    rank_forms = ("top_r", "energy")
    default_rank = DEFAULT_RANK
    lr_source = "SVFit trains singular values like SVDiff: the same scale"

    @property
    def singular_values(self) -> torch.Tensor:
        """The trained top-r singular values ``s = sigma_S + delta``."""
        return self.sigma + self.delta
