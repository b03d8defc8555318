"""Export an SVD adapter as a standard LoRA file.

Per layer the update is ``D = scale * U_S M V_S^T`` (out x in). With the SVD of the small middle matrix
``scale * M = P diag(lam) Q^T`` (trivial for diagonal M), ``D = (U_S P) diag(lam) (V_S Q)^T`` is already an
SVD of D, because ``U_S P`` and ``V_S Q`` have orthonormal columns. So

    lora_B = U_S P[:, :R] diag(sqrt(lam_:R))        lora_A = diag(sqrt(lam_:R)) (V_S Q[:, :R])^T

with ``alpha = R`` (LoRA scaling 1) is exact for R = the numerical rank of D, and for a smaller R it is the
optimal rank-R approximation with relative Frobenius error ``sqrt(sum_{i>R} lam_i^2 / sum_i lam_i^2)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import SVDAdapterError
from .atomic import save_safetensors
from .io import load_adapter
from .layer import NormDeltaLayer, SVDLayer
from .model import adapter_configs, adapter_layers, remove_adapter

KEY_FORMATS = ("diffusers", "peft", "kohya")


@dataclass
class LoRAExportReport:
    """What `export_lora` wrote: per-layer rank and relative Frobenius error, overall error, drops."""

    path: Optional[Path]
    ranks: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    dropped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'layer':<60} {'rank':>5} {'rel. error':>11}"]
        lines += [f"{n:<60} {self.ranks[n]:>5} {self.errors[n]:>11.3e}" for n in self.ranks]
        lines.append(f"overall relative Frobenius error: {self.overall_error:.3e}")
        lines += [f"dropped: {d}" for d in self.dropped]
        return "\n".join(lines)


def lora_factors(layer: SVDLayer, adapter_name: str, rank: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(B (out x R), A (R x in), lam (all singular values of D, descending), R) in float64."""
    method = layer.svd_adapters[adapter_name]
    scale = layer.scales[adapter_name]
    U, V = (t.detach().double() for t in layer.factors(adapter_name))
    if method.diagonal:
        m = method.diag_values().detach().double() * scale
        lam, order = m.abs().sort(descending=True)
        left = U[:, order] * torch.sign(m[order]).where(m[order] != 0, torch.ones_like(lam))
        right = V[:, order]
    else:
        P, lam, Qh = torch.linalg.svd(method.dense().detach().double() * scale)
        left, right = U @ P, V @ Qh.mT
    tol = float(lam[0]) * max(U.shape[0], V.shape[0]) * torch.finfo(torch.float32).eps if lam.numel() else 0.0
    exact = int((lam > tol).sum()) if lam.numel() and float(lam[0]) > 0 else 0
    R = exact if rank is None else min(int(rank), exact)
    root = lam[:R].sqrt()
    return left[:, :R] * root, (right[:, :R] * root).mT, lam, R


def _kohya_text_model_level(model: nn.Module) -> str:
    """A1111 names keep CLIP's ``text_model`` level, which transformers >= 5 dropped from CLIPTextModel."""
    return "text_model_" if "CLIPText" in type(model).__name__ and not hasattr(model, "text_model") else ""


def _default_prefix(model: nn.Module, key_format: str) -> str:
    cls = type(model).__name__
    is_diffusers = any(c.__module__.startswith("diffusers") for c in type(model).__mro__)
    if key_format == "kohya":
        if "UNet" in cls or (is_diffusers and "Transformer" in cls):
            return "lora_unet_"
        if _kohya_text_model_level(model):
            return "lora_te_" + _kohya_text_model_level(model)
        return "lora_te_" if "Text" in cls or "CLIP" in cls or "T5" in cls else "lora_"
    if key_format == "peft":
        return "base_model.model."
    if is_diffusers:
        return "unet." if "UNet" in cls else "transformer." if "Transformer" in cls else ""
    return "text_encoder." if "CLIPText" in cls else ""


def _layer_tensors(layer: SVDLayer, name: str, B: torch.Tensor, A: torch.Tensor, key_format: str,
                   prefix: str, dtype: torch.dtype) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    kind = layer.kind
    R = A.shape[0]
    if kind.name == "conv":
        conv = layer.base_module
        if conv.groups != 1:
            return {}, f"{name}: grouped convolution (groups={conv.groups}) has no LoRA form"
        nd = len(conv.kernel_size)
        A = A.reshape(R, conv.in_channels, *conv.kernel_size)
        B = B.reshape(B.shape[0], R, *([1] * nd))
    if kind.name == "embedding":
        if key_format == "kohya":
            return {}, f"{name}: embedding layers have no kohya LoRA form"
        return {f"{prefix}{name}.lora_embedding_A": B.mT.contiguous().to(dtype),
                f"{prefix}{name}.lora_embedding_B": A.mT.contiguous().to(dtype)}, None
    if key_format == "kohya":
        stem = prefix + name.replace(".", "_")
        return {f"{stem}.lora_down.weight": A.contiguous().to(dtype), f"{stem}.lora_up.weight": B.contiguous().to(dtype),
                f"{stem}.alpha": torch.tensor(float(R), dtype=dtype)}, None
    return {f"{prefix}{name}.lora_A.weight": A.contiguous().to(dtype),
            f"{prefix}{name}.lora_B.weight": B.contiguous().to(dtype)}, None


def _pick_adapter(model: nn.Module, adapter_name: Optional[str]) -> str:
    names = list(adapter_configs(model))
    if adapter_name is None:
        if len(names) != 1:
            raise SVDAdapterError(f"the model has adapters {names}; pass adapter_name= to choose one to export.")
        return names[0]
    if adapter_name not in names:
        raise SVDAdapterError(f"the model has no adapter named {adapter_name!r} (it has {names}).")
    return adapter_name


@dataclass
class _Collected:
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    peft_ranks: Dict[str, int] = field(default_factory=dict)
    bias_keys: List[str] = field(default_factory=list)
    has_hf_conv1d: bool = False
    has_embedding: bool = False
    total_sq: float = 0.0
    dropped_sq: float = 0.0


def _collect(model: nn.Module, name: str, rank: Optional[int], key_format: str, prefix: str, dtype: torch.dtype,
             report: LoRAExportReport, out: _Collected, label: str = "") -> None:
    """Add one model's LoRA tensors (keys start with ``prefix``) to ``out`` and its rows to ``report``."""
    for lname, layer in adapter_layers(model):
        shown = label + lname
        if isinstance(layer, NormDeltaLayer) and name in layer.weight_deltas:
            report.dropped.append(f"{shown}: norm weight delta (no LoRA form)")
            continue
        if not (isinstance(layer, SVDLayer) and name in layer.svd_adapters):
            continue
        B, A, lam, R = lora_factors(layer, name, rank)
        sq = float(lam.pow(2).sum())
        out.total_sq += sq
        bias = layer.svd_adapters[name].bias()
        if R == 0 and (bias is None or key_format == "kohya"):
            report.ranks[shown], report.errors[shown] = 0, 0.0
            if bias is not None:
                report.dropped.append(f"{shown}: bias delta (kohya LoRA has no bias)")
            continue
        if R == 0:  # only a bias delta: a rank-1 pair of zeros carries it
            B = torch.zeros(B.shape[0], 1, dtype=B.dtype)
            A = torch.zeros(1, A.shape[1], dtype=A.dtype)
        layer_tensors, dropped = _layer_tensors(layer, lname, B, A, key_format, prefix, dtype)
        if dropped:
            report.dropped.append(label + dropped)
            R = 0
        dropped_sq = float(lam[R:].pow(2).sum())
        out.dropped_sq += dropped_sq
        report.ranks[shown] = R
        report.errors[shown] = math.sqrt(dropped_sq / sq) if sq > 0 else 0.0
        if dropped:
            continue
        if bias is not None:
            b = (bias.detach().double() * layer.scales[name]).to(dtype)
            if key_format == "kohya":
                report.dropped.append(f"{shown}: bias delta (kohya LoRA has no bias)")
            else:
                out.tensors[f"{prefix}{lname}.lora_B.bias"] = b.contiguous()
                out.bias_keys.append(f"{prefix}{lname}.lora_B.bias")
        out.tensors.update(layer_tensors)
        out.peft_ranks[lname] = A.shape[0]
        out.has_hf_conv1d |= layer.kind.name == "hf_conv1d"
        out.has_embedding |= layer.kind.name == "embedding"


def _pad_kohya_to_uniform_rank(tensors: Dict[str, torch.Tensor]) -> None:
    """Zero-pad every pair to the largest rank R with alpha = R, so the LoRA scaling alpha/rank is 1 whatever
    alpha a consumer falls back to (diffusers' kohya conversion drops some SD 1.5 attn2 alphas)."""
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    R = max((tensors[k].shape[0] for k in downs), default=0)
    for k in downs:
        stem = k[: -len(".lora_down.weight")]
        down, up = tensors[k], tensors[f"{stem}.lora_up.weight"]
        pad = R - down.shape[0]
        if pad:
            tensors[k] = torch.cat([down, down.new_zeros((pad,) + tuple(down.shape[1:]))])
            tensors[f"{stem}.lora_up.weight"] = torch.cat([up, up.new_zeros((up.shape[0], pad) + tuple(up.shape[2:]))], 1)
        tensors[f"{stem}.alpha"] = torch.tensor(float(R), dtype=tensors[f"{stem}.alpha"].dtype)


class AdapterHost:
    """Several adapted models under component names (a diffusers pipeline), as `export_lora` writes them into
    one file. Integrations register a factory in `HOST_FACTORIES` that wraps their objects in a subclass."""

    def components(self) -> Dict[str, nn.Module]:
        """``{component: model}`` of the components that carry adapters."""
        raise NotImplementedError

    def prefix(self, component: str, model: nn.Module, key_format: str) -> str:
        """Key prefix of ``component`` in a ``key_format`` file ("diffusers" or "kohya")."""
        raise NotImplementedError

    def load(self, path, adapter_name: str) -> None:
        raise NotImplementedError

    def unload(self, adapter_name: str) -> None:
        raise NotImplementedError


HOST_FACTORIES: List[Callable[[object], Optional[AdapterHost]]] = []


def as_host(obj) -> Optional[AdapterHost]:
    """``obj`` wrapped by the first registered factory that takes it, or None."""
    if isinstance(obj, nn.Module):
        return None
    for factory in HOST_FACTORIES:
        host = factory(obj)
        if host is not None:
            return host
    return None


def export_lora(source, out_path: Optional[Union[str, os.PathLike]] = None, *, base=None, rank: Optional[int] = None,
                key_format: str = "diffusers", adapter_name: Optional[str] = None, prefix: Optional[str] = None,
                dtype: torch.dtype = torch.float32) -> LoRAExportReport:
    """Write an SVD adapter as a LoRA file and return the per-layer report.

    source:     an adapted model, an adapted diffusers pipeline (one file, component prefixes), or an adapter
                file (then ``base`` is the model or pipeline it was trained on; it is left as it was).
    rank:       None = exact (each layer's numerical rank); an int truncates optimally.
    key_format: "diffusers" (``<component>.<module>.lora_A.weight``; for a bare model the prefix "unet."/
                "text_encoder." is guessed from its class), "peft" (a folder with adapter_config.json when
                ``out_path`` has no suffix, loadable with ``PeftModel.from_pretrained``), or "kohya"
                (``lora_unet_*``, ``lora_te_*``/``lora_te1_*``/``lora_te2_*`` with ``lora_down``/``lora_up``/
                ``alpha``, for A1111 and ComfyUI).
    VectorFit bias deltas are written as ``lora_B.bias`` (diffusers/peft, PEFT's ``lora_bias``) and reported
    as dropped for kohya; norm deltas (SVDiff's 1-D recipe) have no LoRA form and are reported as dropped.
    """
    if key_format not in KEY_FORMATS:
        raise SVDAdapterError(f"key_format={key_format!r} is not supported; choose one of {', '.join(KEY_FORMATS)}.")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise SVDAdapterError(f"rank={rank!r} must be None (exact) or a positive int.")
    host = as_host(source)
    if not isinstance(source, nn.Module) and host is None:
        if base is None:
            raise SVDAdapterError("exporting an adapter file needs base=<the model or pipeline it was trained on>.")
        tmp_name = "svdiff_tools_export"
        base_host = as_host(base)
        if base_host is not None:
            base_host.load(source, tmp_name)
        else:
            load_adapter(base, source, adapter_name=tmp_name)
        try:
            return export_lora(base, out_path, rank=rank, key_format=key_format, adapter_name=tmp_name,
                               prefix=prefix, dtype=dtype)
        finally:
            if base_host is not None:
                base_host.unload(tmp_name)
            else:
                remove_adapter(base, tmp_name)
    report = LoRAExportReport(path=None)
    out = _Collected()
    if host is not None:
        if key_format == "peft":
            raise SVDAdapterError("a pipeline exports as key_format='diffusers' or 'kohya'; 'peft' is per model.")
        parts = host.components()
        names = {n for m in parts.values() for n in adapter_configs(m)}
        name = adapter_name or (next(iter(names)) if len(names) == 1 else None)
        if name is None or name not in names:
            raise SVDAdapterError(f"the pipeline has SVD adapters {sorted(names)}; pass adapter_name= to choose one.")
        for comp, model in parts.items():
            if name in adapter_configs(model):
                _collect(model, name, rank, key_format, host.prefix(comp, model, key_format), dtype,
                         report, out, label=f"{comp}.")
        method = next(adapter_configs(m)[name].method for m in parts.values() if name in adapter_configs(m))
    else:
        model = source
        name = _pick_adapter(model, adapter_name)
        prefix = _default_prefix(model, key_format) if prefix is None else prefix
        _collect(model, name, rank, key_format, prefix, dtype, report, out)
        method = adapter_configs(model)[name].method
    if key_format == "peft" and out.bias_keys and out.has_embedding:  # PEFT's lora_bias rejects Embedding targets
        for key in out.bias_keys:
            del out.tensors[key]
            module = key[len(prefix):-len(".lora_B.bias")]
            report.dropped.append(f"{module}: bias delta (PEFT cannot combine lora_bias with Embedding targets)")
        out.bias_keys = []
    if key_format == "kohya":
        _pad_kohya_to_uniform_rank(out.tensors)
    report.overall_error = math.sqrt(out.dropped_sq / out.total_sq) if out.total_sq > 0 else 0.0
    if out_path is not None:
        path = Path(out_path)
        if key_format == "peft" and not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            ranks = out.peft_ranks
            config = {
                "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
                "r": max(ranks.values(), default=1), "lora_alpha": max(ranks.values(), default=1),
                "target_modules": sorted(ranks), "rank_pattern": ranks, "alpha_pattern": ranks,
                "lora_dropout": 0.0, "bias": "none", "lora_bias": bool(out.bias_keys),
                "fan_in_fan_out": out.has_hf_conv1d, "init_lora_weights": True, "use_dora": False,
                "modules_to_save": None,
            }
            (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
            path = path / "adapter_model.safetensors"
        metadata = {"format": "pt", "svdiff_tools_export": json.dumps(
            {"source_method": method, "rank": rank, "overall_relative_error": report.overall_error})}
        save_safetensors(out.tensors, path, metadata)
        report.path = path
    return report
