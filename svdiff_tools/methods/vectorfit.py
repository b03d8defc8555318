"""VectorFit (Hegde et al., 2025): train a delta on every singular value and on the layer's bias.

``M = diag(delta)``, ``bias' = bias + bias_delta`` (``config.trains_bias`` is on by default);
Adaptive Vector Freezing lives in `svdiff_tools.avf`.
"""

from .base import DiagonalDeltaMethod, Option, register

AVF_METRICS = ("mean_abs", "rms", "max_abs")  # a vector's training strength (`svdiff_tools.avf.METRICS`)


@register
class VectorFit(DiagonalDeltaMethod):
    name = "vectorfit"
    lr_source = "VectorFit paper (Hegde et al. 2025), DreamBooth setting"
    trains_bias_by_default = True
    supports_avf = True
    options = (
        Option("avf_k", int, 0, "VectorFit: vectors frozen per interval (0 = no AVF)", minimum=0),
        Option("avf_interval", int, 50, "VectorFit: steps between AVF re-selections", minimum=1),
        Option("avf_metric", str, "mean_abs", "VectorFit: the training strength AVF ranks vectors by",
               choices=AVF_METRICS),
    )
