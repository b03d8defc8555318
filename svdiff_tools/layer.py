"""Adapter layers that wrap a frozen base module and carry any number of named adapters.

`SVDLayer` wraps Linear / Conv1d/2d/3d / Embedding / transformers Conv1D. For the live (active,
unmerged, enabled) adapters ``a`` it computes

    W' = W + sum_a scale_a * U_a M_a V_a^T        b' = b + sum_a scale_a * bias_delta_a

on the path `forward_paths.choose` picks per call (recomposed, factored, or stacked over a LoRA layer). ``W``
itself is never rebuilt from the factors, so an adapter with ``M = 0`` reproduces the base model bit for bit.
The layer holds the adapters, their bases and the bookkeeping; merge and unmerge shift ``W`` in place.

`NormDeltaLayer` wraps LayerNorm / GroupNorm for SVDiff's 1-D recipe: ``gamma' = gamma + sum_a scale_a *
weight_delta_a``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import forward_paths
from .basis import SVDBasis, TwoSidedBasis, as_dtype
from .config import check_scale
from .forward_paths import LiveAdapter, summed_bias
from .methods import SpectralMethod
from .module_kinds import ModuleKind


# PEFT's tuner-layer protocol: diffusers and PEFT probe for these names (``hasattr(m, "base_layer")``) to find
# LoRA layers. Delegating them to a LoRA layer inside our wrapper would make them treat ours as theirs.
NOT_DELEGATED = frozenset({"base_module", "base_layer", "get_base_layer", "lora_A", "lora_B", "scaling",
                           "merged_adapters", "active_adapter", "disable_adapters"})


def _shift_problem(weight: torch.Tensor, delta: torch.Tensor, what: str) -> Optional[str]:
    """Why ``weight += delta`` (in float32, stored in ``weight``'s dtype) must not be done, or None: the result
    would not be finite, or it would bury the weight under rounding so that subtracting ``delta`` again could
    not restore it (to ``max(1e-3, 10 eps)`` of its norm: a scale like 1e30)."""
    W = weight.detach().float()
    new = (W + delta).to(weight.dtype)
    if not torch.isfinite(new).all():
        return f"would make {what} non-finite"
    tol = max(1e-3, 10 * torch.finfo(weight.dtype).eps)
    if float((new.float() - delta - W).norm()) > tol * float(W.norm()) + 1e-30:
        return f"would bury {what} under rounding (unmerging could not restore it)"
    return None


class AdapterLayerMixin:
    """Bookkeeping shared by the adapter layers: scales, active set, merged set, enable/disable.

    The live adapters (active, unmerged, enabled, non-zero scale) are computed once per state change and
    cached in ``_live``; every mutation below and every ``.to()``/``.half()`` drops the cache, so a forward
    pass costs no bookkeeping. The per-call multiplier ``call_scale`` is applied at call time.

    Attribute look-ups that the wrapper does not answer fall through to the base module, so code that
    reads ``layer.weight``, ``layer.in_features`` or ``conv.kernel_size`` keeps working.
    """

    def _init_bookkeeping(self, base_module: nn.Module) -> None:
        self.base_module = base_module
        self.scales: Dict[str, float] = {}
        self.active_adapters: List[str] = []
        self.merged: Dict[str, float] = {}  # name -> scale it was merged with
        self._disabled = False
        self.call_scale = 1.0  # per-call multiplier (diffusers' cross_attention_kwargs={"scale": s})
        self.invalidate()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name in NOT_DELEGATED or "base_module" not in modules:
                raise
            return getattr(modules["base_module"], name)

    # --- the cached live state --------------------------------------------------------------
    def invalidate(self) -> None:
        """Drop the cached live state (called by every mutation of scales, active/merged sets, devices)."""
        self.__dict__["_live"] = None
        self.__dict__["_paths"] = {}
        self.__dict__.pop("forward", None)  # back to the class's forward (see `_pass_through`)

    def _pass_through(self, *args, **kwargs):
        """The forward while no adapter is live (all merged, disabled or at scale 0): the wrapped module's own
        forward, without a second module call (measured: ~3% of a fused tiny SD pipeline on the CPU). Installed
        as the instance's ``forward`` until the next state change; hooks on the wrapped module still run."""
        base = self._modules["base_module"]
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
            return base(*args, **kwargs)
        return base.forward(*args, **kwargs)

    def _no_live_adapters(self, *args, **kwargs):
        if self._disabled and self.merged:  # disabled means the base model's output, merged adapters included
            return self._forward_unmerged(*args, **kwargs)
        self.__dict__["forward"] = self._pass_through
        return self._pass_through(*args, **kwargs)

    def _forward_unmerged(self, x, *args, **kwargs):
        """The wrapped module's output as if nothing were merged (while adapters are disabled)."""
        raise NotImplementedError

    def _apply(self, *args, **kwargs):  # .to() / .cuda() / .half(): the cached views would be stale
        self.invalidate()
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_live"], state["_paths"] = None, {}
        state.pop("forward", None)
        return state

    @property
    def adapters_disabled(self) -> bool:
        return self._disabled

    @adapters_disabled.setter
    def adapters_disabled(self, value: bool) -> None:
        self._disabled = bool(value)
        self.invalidate()

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter (what fingerprints describe)."""
        W = self.base_module.weight
        if not self.merged:
            return W
        return W.detach().float() - self._merged_weight_delta()

    def live_adapters(self) -> List[str]:
        if self._disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged and self.scales[n] != 0.0]

    def live_scales(self) -> Dict[str, float]:
        """Scale of each live adapter for this call: its own scale times the per-call multiplier."""
        return {n: self.scales[n] * self.call_scale for n in self.live_adapters()}

    def set_scale(self, name: str, scale: float) -> None:
        if name in self.scales:
            self.scales[name] = check_scale(scale)
            self.invalidate()

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.scales]
        self.invalidate()

    def _forget(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        self.scales.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self.invalidate()

    def _merge_names(self, names: Optional[Iterable[str]]) -> List[str]:
        if names is None:
            names = [n for n in self.active_adapters]
        return [n for n in names if n in self.scales and n not in self.merged]

    def _unmerge_names(self, names: Optional[Iterable[str]]) -> List[str]:
        return [n for n in (list(self.merged) if names is None else names) if n in self.merged]


class SVDLayer(AdapterLayerMixin, nn.Module):
    """A frozen Linear/Conv/Embedding plus named spectral adapters (see module docstring)."""

    def __init__(self, base_module: nn.Module, kind: ModuleKind):
        nn.Module.__init__(self)
        self._init_bookkeeping(base_module)
        self.kind = kind
        self.svd_adapters = nn.ModuleDict()
        self.bases = nn.ModuleDict()
        self.basis_of: Dict[str, str] = {}
        self.forward_modes: Dict[str, str] = {}

    # --- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, method: SpectralMethod, basis_key: str, basis: SVDBasis,
                    scale: float = 1.0, forward_mode: str = "auto", basis_storage: str = "auto") -> None:
        """Add adapter ``name``. A one-sided basis is stored whole here when the adapter asks for both factors
        (``basis_storage="both"``), for a forced factored path when U is the derived factor and the kind takes no
        input correction, or when the layer holds merged adapters (the derived columns must come from the
        unmerged weight)."""
        if basis_key not in self.bases:
            self.bases[basis_key] = basis
        basis = self.bases[basis_key]
        keep_both = basis_storage == "both" or (forward_mode == "factored" and not basis.factored_on(self.kind))
        if keep_both and isinstance(basis, TwoSidedBasis):
            basis.restores = None  # asked for both factors for good: no split after a merge
        elif keep_both or (basis.head and self.merged):
            self._store_whole(basis_key, for_merge=not keep_both)
        self.svd_adapters[name] = method
        self.basis_of[name] = basis_key
        self.scales[name] = float(scale)
        self.forward_modes[name] = forward_mode
        self.active_adapters.append(name)
        self.invalidate()

    def remove_adapter(self, name: str) -> None:
        if name not in self.svd_adapters:
            return
        self._forget(name)
        del self.svd_adapters[name]
        key = self.basis_of.pop(name)
        self.forward_modes.pop(name, None)
        if key not in self.basis_of.values():
            del self.bases[key]
        self.invalidate()

    def _store_whole(self, key: str, for_merge: bool) -> None:
        """Store both factors of basis ``key`` from now on (derived columns from the unmerged weight); with
        ``for_merge`` only until the layer's last merge is undone (`_split_bases`)."""
        basis = self.bases[key]
        if basis.head:
            whole = basis.whole(self._base_matrix())
            if not for_merge:
                whole.restores = None
            self.bases[key] = whole

    def _split_bases(self) -> None:
        """Bases stored whole for a merge go back to one-sided storage."""
        for key, basis in list(self.bases.items()):
            if isinstance(basis, TwoSidedBasis) and basis.restores is not None:
                self.bases[key] = basis.split()

    def _base_matrix(self) -> torch.Tensor:
        """The base weight without merged adapters, as an (out x in) matrix."""
        return self.kind.matrix(self.unmerged_weight())

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``U_S`` (out x r) and ``V_S`` (in x r) of adapter ``name`` (a one-sided basis's derived columns are
        computed from the weight, in float64)."""
        basis = self.bases[self.basis_of[name]]
        r = self.svd_adapters[name].rank
        U, V = basis.full_factors(self._base_matrix() if basis.head else None)
        return U[:, :r], V[:, :r]

    def entry(self, name: str, scale: float) -> LiveAdapter:
        """Adapter ``name``'s `LiveAdapter` (views of its basis) with ``scale``."""
        basis = self.bases[self.basis_of[name]]
        method = self.svd_adapters[name]
        return LiveAdapter(method, basis, basis.parts(method.rank), scale, self.forward_modes[name])

    def live(self) -> Tuple[LiveAdapter, ...]:
        """The live adapters with their factors (cached until the next state change)."""
        live = self._live
        if live is None:
            live = self.__dict__["_live"] = tuple(self.entry(n, self.scales[n]) for n in self.live_adapters())
        return live

    # --- deltas -----------------------------------------------------------------------------
    def delta_matrix(self, names: Iterable[str], scales: Optional[Dict[str, float]] = None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``sum_a scale_a * U_a M_a V_a^T`` as an (out x in) matrix."""
        scales = self.scales if scales is None else scales
        entries = [self.entry(n, scales[n]) for n in names]
        W0 = self.kind.matrix(self.kind.module.weight)  # read by one-sided bases, which never coexist with merges
        dtype = dtype or W0.dtype
        if any(e.parts.head for e in entries):
            W0 = as_dtype(W0, dtype)
        total = torch.zeros(W0.shape, dtype=dtype, device=W0.device)
        for e in entries:
            total = e.add_to(total, W0, e.scale)
        return total

    def delta_bias(self, names: Iterable[str], scales: Optional[Dict[str, float]] = None) -> Optional[torch.Tensor]:
        scales = self.scales if scales is None else scales
        return summed_bias((self.svd_adapters[n], scales[n]) for n in names)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base module's output with the live adapters' ``U_a M_a V_a^T`` added, on the path that
        `forward_paths.choose` picks for this input (factored, recomposed, or stacked over a LoRA layer)."""
        live = self._live
        if live is None:
            live = self.live()
        if not live:
            return self._no_live_adapters(x, *args, **kwargs)
        return forward_paths.choose(self, x, live)(self, x, live, args, kwargs)


    # --- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Optional[Iterable[str]] = None, factor: float = 1.0) -> List[str]:
        """``W += factor * scale * U M V^T`` (in float32, then cast back) for each named adapter."""
        done = []
        names = self._merge_names(names)
        if names and not self.merged:  # derived columns come from the unmerged weight: store them first
            for key in list(self.bases):
                self._store_whole(key, for_merge=True)
        for name in names:
            scale = self.scales[name] * factor
            self._add_to_weight(name, scale, +1.0)
            self.merged[name] = scale
            done.append(name)
        self.invalidate()
        return done

    @torch.no_grad()
    def unmerge(self, names: Optional[Iterable[str]] = None) -> List[str]:
        """Subtract what `merge` added (with the scale it was merged with)."""
        done = []
        for name in self._unmerge_names(names):
            self._add_to_weight(name, self.merged.pop(name), -1.0)
            done.append(name)
        if not self.merged and getattr(self, "_created_bias", False):
            self.kind.module.bias = None  # the base had no bias: put it back exactly as it was
            self._created_bias = False
        if done and not self.merged:
            self._split_bases()
        self.invalidate()
        return done

    def _merged_weight_delta(self) -> torch.Tensor:
        return self.kind.weight_from_matrix(self.delta_matrix(list(self.merged), self.merged, torch.float32))

    @torch.no_grad()
    def merge_problem(self, names: Optional[Iterable[str]] = None, factor: float = 1.0) -> Optional[str]:
        """What `merge` would make non-finite (``"the weight of <kind> layer"``), or None; changes nothing."""
        names = self._merge_names(names)
        if not names:
            return None
        scales = {n: self.scales[n] * factor for n in names}
        W = self.kind.module.weight
        delta = self.kind.weight_from_matrix(self.delta_matrix(names, scales, torch.float32))
        what = f"the weight of a {self.kind.name} layer {tuple(W.shape)}"
        problem = _shift_problem(W, delta, what)
        bias = self.delta_bias(names, scales)
        base = getattr(self.kind.module, "bias", None)
        if problem is None and bias is not None:
            problem = _shift_problem(base if base is not None else torch.zeros_like(bias, dtype=W.dtype),
                                     bias.detach().float(), f"the bias of a {self.kind.name} layer {tuple(W.shape)}")
        return problem

    def _forward_unmerged(self, x, *args, **kwargs):
        kind = self.kind
        W = kind.module.weight
        delta = self._merged_weight_delta()
        bias_delta = self.delta_bias(list(self.merged), self.merged)
        if kind.stacked:  # a LoRA layer underneath: its output minus the merged delta's term
            y = self.base_module(x, *args, **kwargs)
            return y - kind.forward(x, delta.to(W.dtype), None if bias_delta is None else bias_delta.to(W.dtype))
        bias = getattr(kind.module, "bias", None)
        if bias is not None and bias_delta is not None:
            bias = None if getattr(self, "_created_bias", False) else (bias.float() - bias_delta).to(bias.dtype)
        return kind.forward(x, (W.float() - delta).to(W.dtype), bias)

    def _add_to_weight(self, name: str, scale: float, sign: float) -> None:
        W = self.kind.module.weight
        delta = self.delta_matrix([name], {name: scale}, dtype=torch.float32)
        new = W.detach().float() + sign * self.kind.weight_from_matrix(delta)
        W.data.copy_(new.to(W.dtype))
        bias = self.delta_bias([name], {name: scale})
        if bias is not None:
            base = self.kind.module
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros(bias.shape, dtype=W.dtype, device=W.device),
                                         requires_grad=False)
                self._created_bias = True
            base.bias.data.copy_((base.bias.detach().float() + sign * bias.detach().float()).to(base.bias.dtype))


class NormDeltaLayer(AdapterLayerMixin, nn.Module):
    """LayerNorm / GroupNorm with additive, per-adapter deltas on its weight (gamma)."""

    def __init__(self, base_module: nn.Module):
        nn.Module.__init__(self)
        self._init_bookkeeping(base_module)
        self.weight_deltas = nn.ParameterDict()

    def add_adapter(self, name: str, scale: float = 1.0) -> None:
        w = self.base_module.weight
        self.weight_deltas[name] = nn.Parameter(torch.zeros(w.shape, device=w.device))
        self.scales[name] = float(scale)
        self.active_adapters.append(name)
        self.invalidate()

    def remove_adapter(self, name: str) -> None:
        if name in self.weight_deltas:
            self._forget(name)
            del self.weight_deltas[name]
            self.invalidate()

    def live(self) -> tuple:
        """``((delta, scale), ...)`` of the live adapters (cached until the next state change)."""
        live = self._live
        if live is None:
            live = self.__dict__["_live"] = tuple((self.weight_deltas[n], self.scales[n]) for n in self.live_adapters())
        return live

    def _delta(self, names, scales=None) -> Optional[torch.Tensor]:
        scales = self.scales if scales is None else scales
        total = None
        for n in names:
            term = self.weight_deltas[n] * scales[n]
            total = term if total is None else total + term
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = self._live
        if live is None:
            live = self.live()
        if not live:
            return self._no_live_adapters(x)
        base = self.base_module
        weight = base.weight
        for delta, scale in live:
            weight = torch.add(weight, delta.to(weight.dtype), alpha=scale * self.call_scale)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, base.bias, base.eps)
        return F.layer_norm(x, base.normalized_shape, weight, base.bias, base.eps)

    @torch.no_grad()
    def merge(self, names=None, factor: float = 1.0) -> List[str]:
        done = self._merge_names(names)
        for n in done:
            self.merged[n] = self.scales[n] * factor
            self._shift(self._delta([n], self.merged), +1.0)
        self.invalidate()
        return done

    @torch.no_grad()
    def unmerge(self, names=None) -> List[str]:
        done = self._unmerge_names(names)
        for n in done:
            self._shift(self._delta([n], {n: self.merged.pop(n)}), -1.0)
        self.invalidate()
        return done

    def _merged_weight_delta(self) -> torch.Tensor:
        return self._delta(list(self.merged), self.merged).detach().float()

    @torch.no_grad()
    def merge_problem(self, names=None, factor: float = 1.0) -> Optional[str]:
        names = self._merge_names(names)
        if not names:
            return None
        w = self.base_module.weight
        delta = self._delta(names, {n: self.scales[n] * factor for n in names}).detach().float()
        return _shift_problem(w, delta, f"the weight of a norm layer {tuple(w.shape)}")

    def _forward_unmerged(self, x):
        base = self.base_module
        weight = (base.weight.float() - self._merged_weight_delta()).to(base.weight.dtype)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, base.bias, base.eps)
        return F.layer_norm(x, base.normalized_shape, weight, base.bias, base.eps)

    def _shift(self, delta: torch.Tensor, sign: float) -> None:
        w = self.base_module.weight
        w.data.copy_((w.detach().float() + sign * delta.detach().float()).to(w.dtype))
