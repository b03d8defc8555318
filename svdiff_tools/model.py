"""Model-level verbs: inject, merge/unmerge, remove, scales, enable/disable, parameter reports.

`inject_adapter` works in two phases so a failure never leaves a half-patched model: it first plans
and builds every adapter (decompositions included) off the model, then attaches them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import cache
from . import decomposition as dec
from .config import SVDAdapterConfig, check_scale
from .errors import SVDAdapterError, SVDTargetError
from .basis import SVDBasis, TwoSidedBasis
from .layer import AdapterLayerMixin, NormDeltaLayer, SVDLayer
from .methods import SpectralMethod, method_class
from .module_kinds import ModuleKind, kind_of
from .targets import base_of as _base, norm_modules, resolve_targets

logger = logging.getLogger(__name__)
CONFIGS_ATTR = "_svd_adapter_configs"
HASH_THREADS = 16
# Integrations (e.g. svdiff_tools.diffusers' per-call scale) run these on a model after an adapter is attached,
# and after its last adapter is removed.
ATTACH_HOOKS: List = []
REMOVE_HOOKS: List = []


# ----------------------------------------------------------------------------------- helpers
def adapter_layers(model: nn.Module) -> Iterator[Tuple[str, AdapterLayerMixin]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayerMixin):
            yield name, module


def adapter_configs(model: nn.Module) -> Dict[str, SVDAdapterConfig]:
    """The configs of the adapters injected into ``model``, by name."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise SVDTargetError("the model itself cannot be replaced in place; wrap the layer in a container, "
                             "e.g. nn.Sequential(layer), and adapt that.")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def basis_dtype(weight: torch.Tensor) -> torch.dtype:
    """Factors live in the compute dtype: half precision stays half, everything else float32/64."""
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32


def basis_key(driver: str, rank: Optional[int], svd_dtype: str) -> str:
    return f"randomized_r{rank}_{svd_dtype}" if driver == "randomized" else f"{driver}_{svd_dtype}"


# ----------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ModuleRecord:
    """How a file says one module was adapted: its rank and decomposition (route, randomised rank, the dtype
    of the decomposed weight)."""
    rank: int
    driver: str
    svd_rank: Optional[int] = None
    weight_dtype: Optional[torch.dtype] = None


@dataclass
class PlannedAdapter:
    name: str
    module: nn.Module  # the model's module now (a plain layer or an SVDLayer)
    kind: ModuleKind
    shape: Tuple[int, int]
    rank: Optional[object]  # None / int / float as requested; an int when fixed by a file
    driver: str  # "gram", "full" or "randomized"
    svd_rank: Optional[int]  # the rank a randomized decomposition is computed for (None when full)
    weight_dtype: Optional[torch.dtype] = None  # decompose the weight as this dtype (from a file)
    digest: Optional[str] = None  # cache key of the matrix to decompose (filled in parallel, see build_planned)
    basis_key: Optional[str] = None  # filled by build_adapter
    basis: Optional[SVDBasis] = None
    method: Optional[SpectralMethod] = None


def check_adapter_name(model: nn.Module, adapter_name: str) -> None:
    """The one check that ``adapter_name`` is a valid, free name on ``model`` (its modules included)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise SVDTargetError(f"adapter_name={adapter_name!r} must be a non-empty string without dots.")
    taken = adapter_name in adapter_configs(model) or any(
        adapter_name in layer.scales for _, layer in adapter_layers(model))
    if taken:
        raise SVDTargetError(f"the model already has an adapter named {adapter_name!r}; pick another adapter_name "
                             "or remove_adapter() it first.")


def plan_adapters(model: nn.Module, config: SVDAdapterConfig, adapter_name: str,
                  records: Optional[Dict[str, ModuleRecord]] = None) -> List[PlannedAdapter]:
    """Check targets and ranks (cheap, before any SVD). ``records`` (from a file) fix the modules, ranks and
    decompositions."""
    if records is not None:
        targets = [(n, model.get_submodule(n)) for n in records]
    else:
        targets = resolve_targets(model, config.target_modules, config.exclude_modules)
    return [plan_module(name, module, config, records[name] if records is not None else None)
            for name, module in targets]


def check_rank_fits(rank, shape: Tuple[int, int], name: str) -> None:
    """An int rank above min(out, in) of an out x in matrix is an `SVDTargetError` naming the module."""
    if isinstance(rank, int) and rank > min(shape):
        raise SVDTargetError(f"rank {rank} exceeds min(out, in) = {min(shape)} of module {name} (matrix {shape[0]}x"
                             f"{shape[1]}); lower --rank or exclude that module.")


def plan_module(name: str, module: nn.Module, config: SVDAdapterConfig,
                record: Optional[ModuleRecord] = None) -> PlannedAdapter:
    """One module's plan: its kind, matrix shape, rank and decomposition route (``record``: as a file fixes them)."""
    cls = method_class(config.method)
    base = _base(module)
    kind = kind_of(base)
    shape = tuple(kind.matrix(base.weight).shape)
    k = min(shape)
    rank = record.rank if record is not None else cls.requested_rank(config)
    check_rank_fits(rank, shape, name)
    if record is not None:
        driver, svd_rank = record.driver, record.svd_rank
    else:
        driver = dec.resolve_driver(config.svd_driver, rank if isinstance(rank, int) else None, k)
        svd_rank = rank if driver == "randomized" else None
    return PlannedAdapter(name, module, kind, shape, rank, driver, svd_rank,
                          record.weight_dtype if record is not None else None)


def _choose_rank(requested, S: torch.Tensor, weight_matrix: torch.Tensor, n_valid: int, name: str,
                 fixed: bool) -> int:
    if fixed:
        return int(requested)
    if requested is None:
        return n_valid
    if isinstance(requested, float):
        total = float(weight_matrix.detach().double().pow(2).sum())
        if total == 0.0:
            return 0
        energy = torch.cumsum(S.double().pow(2), 0) / total
        r = int(torch.searchsorted(energy, torch.tensor(requested, dtype=torch.float64)).item()) + 1
        return min(r, n_valid)
    if requested > n_valid:
        logger.warning("module %s has numerical rank %d < rank %d; training its top %d components only",
                       name, n_valid, requested, n_valid)
    return min(int(requested), n_valid)


def decomposed_matrix(kind: ModuleKind, weight: torch.Tensor, trained_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The matrix to decompose. An adapter trained on a lower-precision copy of this weight (say bf16 while
    the model is now fp32) is decomposed from the weight rounded to that dtype, which restores the exact
    training basis; the other way round the basis differs by the rounding (see `load_adapter`)."""
    W = kind.matrix(weight)
    if trained_dtype is not None and trained_dtype != W.dtype and W.dtype.is_floating_point and \
            torch.finfo(trained_dtype).eps > torch.finfo(W.dtype).eps:
        W = W.to(trained_dtype)
    return W


def _decomposition_input(plan: PlannedAdapter, config: SVDAdapterConfig):
    """(matrix to decompose, basis key, the layer's existing basis under that key or None)."""
    weight = _base(plan.module).weight
    if isinstance(plan.module, SVDLayer) and plan.module.merged:  # every basis comes from the unmerged weight
        weight = plan.module.unmerged_weight().to(weight.dtype)
    W = decomposed_matrix(plan.kind, weight, plan.weight_dtype)
    key = basis_key(plan.driver, plan.svd_rank, config.svd_dtype) + f"_{str(W.dtype).split('.')[-1]}"
    existing = plan.module.bases[key] if isinstance(plan.module, SVDLayer) and key in plan.module.bases else None
    return W, key, existing


def hash_weights(plans: List[PlannedAdapter], config: SVDAdapterConfig) -> None:
    """Fill ``plan.digest`` for every weight that needs decomposing, on all cores (hashlib releases the GIL).
    Hashing the exact bytes is what a warm start from the cache costs, so it is spread over threads."""
    if cache.cache_dir() is None:
        return
    todo = [plan for plan in plans if plan.digest is None and _decomposition_input(plan, config)[2] is None]
    if not todo:
        return

    def digest(plan: PlannedAdapter) -> str:  # the matrix is made in the worker: a few in memory at a time
        return cache.weight_digest(_decomposition_input(plan, config)[0])

    workers = max(1, min(len(todo), os.cpu_count() or 1, HASH_THREADS))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for plan, value in zip(todo, pool.map(digest, todo)):
            plan.digest = value


def build_adapter(plan: PlannedAdapter, config: SVDAdapterConfig, fixed_rank: bool) -> None:
    """Decompose (or reuse the layer's basis) and create the method module, off the model."""
    base = _base(plan.module)
    cls = method_class(config.method)
    W, key, existing = _decomposition_input(plan, config)
    if existing is not None:
        basis = existing
        S = basis.S
        U, V = basis.full_factors(W) if basis.head and cls.needs_factors(config) else (basis.U, basis.V)
    else:
        d = dec.decompose(W, rank=plan.svd_rank, driver=plan.driver, dtype=config.svd_dtype, digest=plan.digest)
        dt = basis_dtype(base.weight)
        U, S, V = d.U, d.S, d.V
        # one-sided: a full-spectrum method, not under a PEFT layer, W itself the decomposed matrix (not a
        # rounded copy of it: the derived columns are computed from the live weight)
        one_sided = (SVDBasis.worth_one_sided(config.basis_storage, plan.shape,
                                               plan.kind.supports_input_correction()) and plan.svd_rank is None
                     and cls.requested_rank(config) is None and not plan.kind.stacked
                     and W.dtype == base.weight.dtype)
        make = SVDBasis.one_sided if one_sided else TwoSidedBasis
        basis = make(U.to(dt), S.to(torch.float32), V.to(dt), plan.driver, plan.svd_rank, W.dtype)
    n_valid = dec.numerical_rank(S.float(), plan.shape)
    r = _choose_rank(plan.rank, S, W, n_valid, plan.name, fixed_rank)
    if r > S.shape[0]:
        raise SVDTargetError(f"module {plan.name} needs {r} components but its decomposition has {S.shape[0]}.")
    out_features = plan.kind.out_features if plan.kind.has_channels_last_bias else None
    method = cls(S[:r].float(), config, out_features, U[:, :r], V[:, :r])
    if any(p.is_meta for p in method.parameters()):  # made under PEFT's low_cpu_mem_usage: loading assigns them
        for name, buf in list(method.named_buffers(recurse=False)):
            setattr(method, name, buf.to(base.weight.device))
    else:
        method.to(base.weight.device)
    plan.basis_key, plan.basis, plan.method = key, basis, method


def attach(model: nn.Module, plans: List[PlannedAdapter], config: SVDAdapterConfig, adapter_name: str) -> None:
    for plan in plans:
        layer = plan.module
        if not isinstance(layer, SVDLayer):
            layer = SVDLayer(plan.module, plan.kind)
            _replace(model, plan.name, layer)
        layer.add_adapter(adapter_name, plan.method, plan.basis_key, plan.basis, config.scale, config.forward_mode,
                          config.basis_storage)


def attach_norms(model: nn.Module, config: SVDAdapterConfig, adapter_name: str,
                 names: Optional[Iterable[str]] = None) -> None:
    pairs = norm_modules(model, config.exclude_modules) if names is None else \
        [(n, model.get_submodule(n)) for n in names]
    for name, module in pairs:
        layer = module
        if not isinstance(layer, NormDeltaLayer):
            layer = NormDeltaLayer(module)
            _replace(model, name, layer)
        layer.add_adapter(adapter_name, config.scale)


# ----------------------------------------------------------------------------------- public verbs
def inject_adapter(model: nn.Module, config: SVDAdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Adapt the modules of ``model`` that ``config.target_modules`` matches, in place.

    Afterwards only this adapter's tensors are trainable (the rest of the model is frozen). Returns
    ``model``. Nothing on the model changes if any target, rank or decomposition fails.
    """
    attach_planned(model, build_planned(model, config, adapter_name), config, adapter_name)
    model.requires_grad_(False)
    for p in adapter_parameters(model, adapter_name).values():
        p.requires_grad_(True)
    return model


def build_planned(model: nn.Module, config: SVDAdapterConfig, adapter_name: str, *,
                  records: Optional[Dict[str, ModuleRecord]] = None) -> List[PlannedAdapter]:
    """Plan and build every adapter off the model (decompositions included). ``records`` pin the modules,
    ranks and decompositions as an adapter file recorded them."""
    check_adapter_name(model, adapter_name)
    plans = plan_adapters(model, config, adapter_name, records)
    hash_weights(plans, config)
    for plan in plans:  # the expensive part, still off the model
        build_adapter(plan, config, fixed_rank=records is not None)
    return plans


def attach_planned(model: nn.Module, plans: List[PlannedAdapter], config: SVDAdapterConfig, adapter_name: str,
                   norms: Optional[List[str]] = None) -> None:
    """Attach built adapters; on any failure (even an interrupt) the adapter is removed again."""
    try:
        attach(model, plans, config, adapter_name)
        if config.train_norms:
            attach_norms(model, config, adapter_name, norms)
        adapter_configs(model)[adapter_name] = config
    except BaseException:
        discard_adapter(model, adapter_name)
        raise
    for hook in ATTACH_HOOKS:
        hook(model)


def adapter_parameters(model: nn.Module, adapter_name: str) -> Dict[str, nn.Parameter]:
    """``{"<module>.<tensor>": parameter}`` of one adapter (the names used in adapter files)."""
    out = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, SVDLayer) and adapter_name in layer.svd_adapters:
            for pname, p in layer.svd_adapters[adapter_name].named_parameters():
                out[f"{name}.{pname}"] = p
        elif isinstance(layer, NormDeltaLayer) and adapter_name in layer.weight_deltas:
            out[f"{name}.weight_delta"] = layer.weight_deltas[adapter_name]
    return out


def get_adapter_names(model: nn.Module) -> List[str]:
    return list(adapter_configs(model))


def _names(model: nn.Module, adapter_names) -> Optional[List[str]]:
    if adapter_names is None:
        return None
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise SVDTargetError(f"no adapter named {unknown[0]!r}; the model has {get_adapter_names(model)}.")
    return names


def merge_adapter(model: nn.Module, adapter_names=None, scale: float = 1.0) -> None:
    """``W += scale * adapter_scale * U M V^T`` for the named (default: active) adapters; inference then
    costs nothing. `unmerge_adapter` subtracts exactly what was added. Like PEFT's ``safe_merge``, every
    merged weight is computed and checked first (`check_merge`): if any would hold NaN or inf (or overflow its
    dtype), nothing is merged. Refused while adapters are disabled (disabled means the base model's output)."""
    names, scale = check_merge(model, adapter_names, scale)
    for _, layer in adapter_layers(model):
        layer.merge(names, factor=scale)


def check_merge(model: nn.Module, adapter_names=None, scale: float = 1.0) -> Tuple[Optional[List[str]], float]:
    """Everything `merge_adapter` refuses, checked without changing the model; returns (names, scale)."""
    names = _names(model, adapter_names)
    scale = check_scale(scale, "scale")
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.adapters_disabled for layer in layers):
        raise SVDAdapterError("adapters are disabled; call enable_adapters() before merging them.")
    for layer in layers:
        bad = layer.merge_problem(names, factor=scale)
        if bad:
            raise SVDAdapterError(f"merging {bad} (scale too large or adapter diverged); nothing was merged: "
                                  "lower the scale or use an earlier checkpoint.")
    return names, scale


def unmerge_adapter(model: nn.Module, adapter_names=None) -> None:
    """Subtract merged adapters again (weights return to within float rounding)."""
    names = _names(model, adapter_names)
    for _, layer in adapter_layers(model):
        layer.unmerge(names)


def merge_and_unload(model: nn.Module, adapter_names=None, scale: float = 1.0) -> nn.Module:
    """Merge the named (default: active) adapters into the weights for good and remove every adapter layer:
    the model is a plain model again, with the adapted weights (PEFT's ``merge_and_unload``). Adapters not
    merged are dropped. Returns ``model``."""
    check_merge(model, adapter_names, scale)
    merge_adapter(model, adapter_names, scale=scale)
    created = [name for name, layer in adapter_layers(model) if getattr(layer, "_created_bias", False)]
    if created:
        logger.warning("merged bias deltas into %d layers that had no bias (e.g. %s): the model now carries those "
                       "biases, but a saved copy loads them only where its architecture has a bias slot (diffusers "
                       "attention projections have none, and drop them).", len(created), created[0])
    for name, layer in list(adapter_layers(model)):
        _replace(model, name, layer.base_module)  # merged weights (and a bias a merge created) stay
    adapter_configs(model).clear()
    for hook in REMOVE_HOOKS:
        hook(model)
    return model


def remove_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Remove one adapter (default: all). Layers left without adapters become the original modules again."""
    if adapter_name is not None:
        _names(model, adapter_name)
    discard_adapter(model, adapter_name)


def discard_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """`remove_adapter` without the name check: also clears a half-attached adapter after a failure."""
    names = [adapter_name] if adapter_name is not None else None
    for name, layer in list(adapter_layers(model)):
        for n in (names if names is not None else list(layer.scales)):
            layer.remove_adapter(n)
        if not layer.scales:
            layer.unmerge()
            _replace(model, name, layer.base_module)
    configs = adapter_configs(model)
    for n in (names if names is not None else list(configs)):
        configs.pop(n, None)
    if not configs:
        for hook in REMOVE_HOOKS:
            hook(model)


def set_adapter_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    _names(model, adapter_name)
    scale = check_scale(scale, "scale")
    for _, layer in adapter_layers(model):
        layer.set_scale(adapter_name, scale)


def set_active_adapters(model: nn.Module, adapter_names, weights: Optional[Iterable[float]] = None) -> None:
    """Make exactly these adapters active, optionally with new scales (one per adapter)."""
    names = _names(model, adapter_names)
    weights = list(weights) if weights is not None else None
    if weights is not None and len(weights) != len(names):
        raise SVDTargetError(f"got {len(weights)} weights for {len(names)} adapters; pass one weight per adapter.")
    if weights is not None:
        weights = [check_scale(w, "weight") for w in weights]
    for _, layer in adapter_layers(model):
        layer.set_active(names)
        for n, w in zip(names, weights or []):
            layer.set_scale(n, w)


def enable_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.adapters_disabled = False


def disable_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.adapters_disabled = True


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with adapters_disabled(model):`` runs the base model (unmerged adapters are skipped)."""
    disable_adapters(model)
    try:
        yield model
    finally:
        enable_adapters(model)


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts, adapter layers' frozen factors not included."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line


def get_parameter_groups(model: nn.Module, lr: float, lr_1d: Optional[float] = None,
                         weight_decay: float = 0.0) -> List[dict]:
    """Optimizer groups: spectral/bias deltas at ``lr``; norm (1-D weight) deltas at ``lr_1d``.

    SVDiff's recipe is lr=1e-3 for the matrices and lr_1d=1e-6 for 1-D weights. Weight decay acts on
    the deltas, so it pulls toward the base model.
    """
    matrix, vector = [], []
    for _, layer in adapter_layers(model):
        if isinstance(layer, NormDeltaLayer):
            vector += [p for p in layer.weight_deltas.parameters() if p.requires_grad]
        else:
            matrix += [p for p in layer.svd_adapters.parameters() if p.requires_grad]
    groups = [{"params": matrix, "lr": lr, "weight_decay": weight_decay}]
    if vector:
        groups.append({"params": vector, "lr": lr if lr_1d is None else lr_1d, "weight_decay": weight_decay})
    return groups
