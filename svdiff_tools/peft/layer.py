"""The PEFT tuner layer: a thin `BaseTunerLayer` over this library's `SVDLayer` (same bases, methods, module
kinds and forward paths; no second implementation of the math).

PEFT treats every child of a tuner layer but ``base_layer`` as the method's (to save, load and train) and expects
``<prefix>adapters.<adapter name>.<tensor>`` keys. So the tuner layer's children are the base layer, the core
layer's method ModuleDict as ``<prefix>adapters`` and its bases as ``<prefix>bases`` (non-persistent buffers,
never saved); the core `SVDLayer` itself is a plain attribute that computes everything. PEFT's bookkeeping
(active adapters, merged adapters, disabled) is mirrored into the core layer.

As PEFT's own tuner layers do, a layer reports ``in_features`` / ``out_features`` (channels for convs, vocabulary and
width for embeddings), creates a new adapter's floating tensors in the base layer's dtype (PEFT's
``autocast_adapter_dtype=True``, its default, then upcasts fp16/bf16 ones to float32; ``False`` keeps them), and
takes ``init_weights=False``: a small seeded random delta instead of zero, for tests that need a non-identity
adapter (never for training).
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, List, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from ..errors import SVDAdapterFileError, SVDTargetError
from ..fingerprint import fingerprint, mismatch
from ..layer import SVDLayer
from ..model import build_adapter, hash_weights, plan_module
from ..module_kinds import kind_of


def _prepare_tensors(method: nn.Module, dtype: torch.dtype, key: str, init_weights: bool) -> None:
    """A new adapter's floating parameters in the base layer's floating ``dtype``; with ``init_weights=False``, a
    random delta of about a tenth of the mean adapted singular value, seeded by the module's name (reproducible)."""
    with torch.no_grad():
        if not init_weights:
            gen = torch.Generator().manual_seed(int(hashlib.blake2b(key.encode(), digest_size=8).hexdigest(), 16) >> 1)
            size = 0.1 * float(method.sigma.mean()) if method.sigma.numel() else 0.1
            for p in method.parameters():
                if not p.is_meta:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p) * size)
        if dtype.is_floating_point:
            for p in method.parameters():
                p.data = p.data.to(dtype)


class SVDTunerLayer(nn.Module, BaseTunerLayer):
    prefix: ClassVar[str] = ""  # set per method ("svdiff_", ...)
    adapter_layer_names: ClassVar[tuple] = ()
    other_param_names: ClassVar[tuple] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str):
        nn.Module.__init__(self)
        kind = kind_of(base_layer)
        if kind is None:
            raise SVDTargetError(f"module {key} is a {type(base_layer).__name__}, which {self.prefix[:-1]} cannot adapt; "
                                 "target Linear, Conv or Embedding layers.")
        core = SVDLayer(base_layer, kind)
        self.base_layer = base_layer  # the same module the core wraps
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self.add_module(self.adapter_layer_names[0], core.svd_adapters)  # the core's methods, under the prefix
        self.add_module(f"{self.prefix}bases", core.bases)  # its bases (non-persistent buffers): moved with .to()
        object.__setattr__(self, "core", core)  # not a child: PEFT counts every child but base_layer as the method's
        self._disable_adapters = False
        self.merged_adapters: List[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, key)

    def update_layer(self, adapter_name: str, config, key: str) -> None:
        """Decompose (or reuse the layer's basis) and add ``adapter_name``'s method; the base weight must match
        the fingerprint the config records for ``key`` (a loaded adapter), else it is recorded (a new one)."""
        weight = self.core.unmerged_weight()
        recorded = config.base_fingerprints.get(key)
        if recorded is not None:
            reason = mismatch(recorded, weight)
            if reason is not None:
                raise SVDAdapterFileError(f"this {self.prefix[:-1]} adapter was trained on another base model: "
                                          f"{key} differs ({reason}); load it into the base model it was trained on.")
        elif getattr(config, "_sealed", False):
            raise SVDAdapterFileError(f"this {self.prefix[:-1]} adapter records no base fingerprint for {key}, which "
                                      "its targets match in this model; it was trained for another architecture.")
        else:
            config.base_fingerprints[key] = fingerprint(weight)
        core_config = config.core()
        plan = plan_module(key, self.core, core_config)
        hash_weights([plan], core_config)
        build_adapter(plan, core_config, fixed_rank=False)
        _prepare_tensors(plan.method, self.core.base_module.weight.dtype, key, config.init_weights)
        self.core.add_adapter(adapter_name, plan.method, plan.basis_key, plan.basis, core_config.scale,
                              core_config.forward_mode, core_config.basis_storage)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- PEFT's bookkeeping, mirrored into the core layer --------------------------------------
    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.core.set_active([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.core.adapters_disabled = not enabled

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)
        if not names:
            return
        if safe_merge:
            problem = self.core.merge_problem(names)
            if problem:
                raise ValueError(f"merging {problem}; the adapter seems to be broken.")
        self.merged_adapters.extend(self.core.merge(names))

    def unmerge(self) -> None:
        self.core.unmerge()
        self.merged_adapters.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        self.core.remove_adapter(adapter_name)
        super().delete_adapter(adapter_name)

    # --- the verbs diffusers' LoRA loader calls on every PEFT tuner layer -------------------------
    def set_scale(self, adapter_name: str, scale: float) -> None:
        """``set_adapters(..., weights)``: the adapter's weight in the sum of adapters."""
        if adapter_name in self.core.scales:
            self.core.set_scale(adapter_name, scale)

    def scale_layer(self, scale: float) -> None:
        """The per-call strength (``cross_attention_kwargs={"scale": s}``): multiplies every live adapter."""
        self.core.call_scale = self.core.call_scale * float(scale)

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        self.core.call_scale = 1.0 if scale is None else self.core.call_scale / float(scale)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale * U M V^T`` in the base weight's layout (what PEFT's LoRA conversion factorises)."""
        return self.core.kind.weight_from_matrix(self.core.delta_matrix([adapter_name]))

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """PEFT >= 0.22's ``get_additive_delta`` (W' - W, what its LoRA conversion factorises): every method here is
        additive, so it is `get_delta_weight`."""
        return self.get_delta_weight(adapter_name)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return self.core.kind.name in ("linear", "conv") and self.core.svd_adapters[adapter_name].bias() is None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.core(x, *args, **kwargs)

    def _apply(self, *args, **kwargs):  # .to() / .half(): the core's cached views of the bases would be stale
        self.core.invalidate()
        return super()._apply(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.prefix[:-1]}.{super().__repr__()}"
