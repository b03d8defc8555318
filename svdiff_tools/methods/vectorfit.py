"""VectorFit (Hegde et al., 2025): train a delta on every singular value and on the layer's bias.

``M = diag(delta)``, ``bias' = bias + bias_delta`` (``config.trains_bias`` is on by default);
Adaptive Vector Freezing lives in `svdiff_tools.avf`.
"""

from .base import DiagonalDeltaMethod, register


@register
class VectorFit(DiagonalDeltaMethod):
    name = "vectorfit"
    lr_source = "VectorFit paper (Hegde et al. 2025), DreamBooth setting"
    trains_bias_by_default = True
    supports_avf = True
