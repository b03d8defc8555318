"""SVDiff (Han et al., 2023): shift every singular value, clipped so that sigma + delta stays >= 0.

``M = diag(relu(sigma + delta) - sigma) = diag(max(delta, -sigma))``; trainable ``delta`` (r,), r = every
non-zero component. The second form is one op and exact (no ``(sigma + delta) - sigma`` rounding).
"""

import torch

from .base import DiagonalDeltaMethod, register


@register
class SVDiff(DiagonalDeltaMethod):
    name = "svdiff"
    lr_source = "SVDiff paper (Han et al. 2023): 1e-3 for the spectral shifts"

    def diag_values(self):
        return torch.clamp(self.delta, min=-self.sigma)
