"""Keep SVD adapters alive through diffusers' ``fuse_qkv_projections()``.

Diffusers fuses ``to_q``/``to_k``/``to_v`` into one Linear ``to_qkv = [W_q; W_k; W_v]`` (also ``to_kv`` and
``to_added_qkv``) built from the parts' ``weight.data``, which bypasses adapter layers. After it fuses, we
wrap each fused projection in `FusedSVDProjection`, whose update stacks the parts' live deltas:

    W' = W_fused + [D_q; D_k; D_v]        b' = b_fused + [d_q; d_k; d_v]

The parts stay where they are (``unfuse_qkv_projections`` goes back to them), so scales, the per-call
strength, enable/disable and merging keep working. Load adapters before fusing, as with LoRA.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import NOT_DELEGATED, SVDLayer

FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
         "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


class FusedSVDProjection(nn.Module):
    def __init__(self, base_module: nn.Linear, parts: Sequence[nn.Module]):
        super().__init__()
        self.base_module = base_module
        self._parts = tuple(parts)  # a tuple: not registered, they remain children of the attention module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in NOT_DELEGATED:
                raise
            return getattr(self._modules["base_module"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_module
        live = [p.live_scales() if isinstance(p, SVDLayer) else {} for p in self._parts]
        if not any(live):
            return base(x)
        W = base.weight
        deltas, biases, has_bias = [], [], False
        for part, scales in zip(self._parts, live):
            out_features = part.weight.shape[0]
            if scales:
                deltas.append(part.delta_matrix(list(scales), scales, dtype=torch.float32))
                b = part.delta_bias(list(scales), scales)
            else:
                deltas.append(torch.zeros(out_features, W.shape[1], device=W.device))
                b = None
            has_bias |= b is not None
            biases.append(torch.zeros(out_features, device=W.device) if b is None else b)
        weight = W + torch.cat(deltas).to(W.dtype)
        bias = base.bias
        if has_bias:
            extra = torch.cat(biases).to(W.dtype)
            bias = extra if bias is None else bias + extra
        return F.linear(x, weight, bias)


def _wrap_fused(attn: nn.Module) -> None:
    for fused, names in FUSED.items():
        layer = getattr(attn, fused, None)
        parts = [getattr(attn, n, None) for n in names]
        if isinstance(layer, nn.Linear) and all(p is not None for p in parts) and \
                any(isinstance(p, SVDLayer) for p in parts):
            setattr(attn, fused, FusedSVDProjection(layer, parts))


def _wrap_method(cls) -> None:
    original = cls.__dict__.get("fuse_projections")
    if original is None or getattr(original, "_svd_wrapped", False):
        return

    def fuse_projections(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _wrap_fused(self)
        return result

    fuse_projections._svd_wrapped = True
    fuse_projections.__doc__ = original.__doc__
    cls.fuse_projections = fuse_projections


def install() -> None:
    """Wrap ``fuse_projections`` of diffusers' attention classes once (idempotent): the classic `Attention`
    (UNets, SD3) and `AttentionModuleMixin` (Flux and newer transformers)."""
    try:
        from diffusers.models.attention_processor import Attention
    except Exception:  # pragma: no cover
        return
    _wrap_method(Attention)
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except Exception:  # pragma: no cover - older diffusers
        return
    _wrap_method(AttentionModuleMixin)
