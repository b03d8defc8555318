"""Diffusers integration, an explicit opt-in: ``import svdiff_tools.diffusers`` adds the loader methods
(``pipe.load_svd_adapter(path)``, ``set_svd_adapters``, ``fuse_svd_adapter`` ...) to every `DiffusionPipeline`,
the per-call scale (``cross_attention_kwargs={"scale": s}``), fused projections and pipeline export. Importing it
imports diffusers; ``import svdiff_tools`` alone patches nothing (the core never imports this package or diffusers).
"""

from __future__ import annotations

_installed = False


def install() -> None:
    """Add the loader methods to `diffusers.DiffusionPipeline`, wrap fused projections, register the per-call
    scale hooks and pipeline export with the core (idempotent; this package's import calls it)."""
    global _installed
    if _installed:
        return
    try:
        from diffusers import DiffusionPipeline
    except ImportError as exc:
        raise ImportError(f"svdiff_tools.diffusers needs diffusers ({exc}); pip install diffusers.") from None
    from . import call_scale, export, fused_projections, loaders

    for name, fn in loaders.MIXIN_METHODS.items():
        setattr(DiffusionPipeline, name, fn)
    fused_projections.install()
    call_scale.register()
    export.register()
    _installed = True


install()
