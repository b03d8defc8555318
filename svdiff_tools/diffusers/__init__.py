"""Diffusers integration: the loader methods on every `DiffusionPipeline`, the per-call scale, fused
projections and pipeline export. The core never imports this package or diffusers.

When is `DiffusionPipeline` patched? `import svdiff_tools` patches it at once if diffusers' pipelines are
already imported, and otherwise right after diffusers imports the module that defines `DiffusionPipeline`
(`install_when_imported`, a one-shot import hook), so ``import svdiff_tools`` costs nothing for users who
never touch diffusers pipelines and works where diffusers is not installed. `install()` does it explicitly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"  # defines DiffusionPipeline
_installed = False


def install() -> bool:
    """Add the loader methods to `diffusers.DiffusionPipeline`, wrap fused projections, register the per-call
    scale hooks and pipeline export with the core (idempotent). False if diffusers is missing."""
    global _installed
    if _installed:
        return True
    try:
        from diffusers import DiffusionPipeline
    except Exception:
        return False
    from . import call_scale, export, fused_projections, loaders

    for name, fn in loaders.MIXIN_METHODS.items():
        setattr(DiffusionPipeline, name, fn)
    fused_projections.install()
    call_scale.register()
    export.register()
    _installed = True
    return True


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        install()


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Finds `PIPELINE_MODULE` with the other finders and wraps its loader so that `install` runs right after
    the module is executed; removes itself then."""

    def find_spec(self, name, path, target=None):
        if name != PIPELINE_MODULE:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install_when_imported() -> None:
    """Install now if diffusers' pipelines are imported, else as soon as they are."""
    if PIPELINE_MODULE in sys.modules:
        install()
    elif not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())
