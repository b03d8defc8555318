"""svdiff-tools: personalise diffusion models and transformers by fine-tuning their own spectrum.

Every method is ``W' = W + scale * U_S M V_S^T`` over the thin SVD ``W = U diag(sigma) V^T`` of each
adapted weight, with a structured middle matrix ``M`` (see the README for the per-method table).

Importing this package patches nothing and imports neither diffusers nor PEFT. The integrations are explicit
opt-ins: ``import svdiff_tools.diffusers`` adds ``pipe.load_svd_adapter(...)`` and its companions to diffusers'
pipelines; ``import svdiff_tools.peft`` registers the methods with PEFT.
"""

from .version import __version__  # noqa: F401  (public)

from .avf import AdaptiveVectorFreezing
from .config import SVDAdapterConfig
from .estimate import Estimate, estimate
from .errors import SVDAdapterError, SVDAdapterFileError, SVDConfigError, SVDTargetError
from .export import LoRAExportReport, export_lora
from .io import DEFAULT_WEIGHT_NAME, load_adapter, save_adapter
from .layer import NormDeltaLayer, SVDLayer
from .methods import METHODS
from .model import (adapters_disabled, count_parameters, disable_adapters, enable_adapters, get_adapter_names,
                    get_parameter_groups, inject_adapter, merge_adapter, merge_and_unload, print_trainable_parameters,
                    remove_adapter, set_active_adapters, set_adapter_scale, unmerge_adapter)
from .targets import PRESETS

__all__ = [
    "AdaptiveVectorFreezing", "DEFAULT_WEIGHT_NAME", "Estimate", "estimate", "LoRAExportReport", "METHODS", "NormDeltaLayer", "PRESETS",
    "SVDAdapterConfig", "SVDAdapterError", "SVDAdapterFileError", "SVDConfigError", "SVDLayer", "SVDTargetError",
    "adapters_disabled", "count_parameters", "disable_adapters", "enable_adapters", "export_lora",
    "get_adapter_names", "get_parameter_groups", "inject_adapter", "load_adapter", "merge_adapter", "merge_and_unload",
    "print_trainable_parameters", "remove_adapter", "save_adapter", "set_active_adapters", "set_adapter_scale",
    "unmerge_adapter",
]
