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
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .errors import SVDAdapterError
from .atomic import save_safetensors, write_text
from .io import load_adapter
from .layer import NormDeltaLayer, SVDLayer
from .model import adapter_configs, adapter_layers, remove_adapter

logger = logging.getLogger(__name__)
KEY_FORMATS = ("diffusers", "peft", "kohya")
# Every kohya pair gets this alpha, with rank / alpha folded into its weights. Per-layer alphas would be enough for
# A1111 and ComfyUI, but diffusers' kohya conversion names the alphas of attention-processor layers (to_q/k/v/out
# of attn1/attn2) so that they match no module, and PEFT then gives those layers the file's most common alpha:
# with per-layer ranks, SD-1.5's attn2.to_k/to_v (rank min(out, 768)) got alpha/rank != 1. With one alpha for all,
# the fallback alpha is that alpha, and every consumer computes the same scale.
KOHYA_ALPHA = 1.0


@dataclass
class LoRAExportReport:
    """What `export_lora` wrote: per-layer rank and relative Frobenius error, overall error, drops, the file's
    bytes and the bytes of the weights it modifies (at the export dtype)."""

    path: Optional[Path]
    ranks: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)
    overall_error: float = 0.0
    dropped: List[str] = field(default_factory=list)
    file_bytes: int = 0
    weight_bytes: int = 0

    @property
    def summary(self) -> str:
        ranks = list(self.ranks.values()) or [0]
        return (f"{len(self.ranks)} layers, ranks {min(ranks)}-{max(ranks)}, overall relative error "
                f"{self.overall_error:.2e}, {self.file_bytes / 2**20:.1f} MiB "
                f"({self.file_bytes / max(self.weight_bytes, 1):.2f}x the {self.weight_bytes / 2**20:.1f} MiB of "
                "weights it modifies)")

    def __str__(self) -> str:
        lines = [f"{'layer':<60} {'rank':>5} {'rel. error':>11}"]
        lines += [f"{n:<60} {self.ranks[n]:>5} {self.errors[n]:>11.3e}" for n in self.ranks]
        lines.append(f"overall relative Frobenius error: {self.overall_error:.3e}")
        lines += [f"dropped: {d}" for d in self.dropped]
        lines.append(self.summary)
        return "\n".join(lines)


def energy_rank(lam: torch.Tensor, fraction: float, exact: int) -> int:
    """The fewest leading components whose squared singular values hold ``fraction`` of the total."""
    if exact == 0:
        return 0
    energy = torch.cumsum(lam[:exact].double().pow(2), 0)
    wanted = fraction * float(energy[-1]) * (1 - 1e-12)
    return min(exact, int(torch.searchsorted(energy, torch.tensor(wanted, dtype=energy.dtype)).item()) + 1)


def lora_factors(layer: SVDLayer, adapter_name: str, rank: Optional[Union[int, float]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(B (out x R), A (R x in), lam (all singular values of D, descending), R) in float64. ``rank``: None =
    exact, an int = at most that rank, a float in (0, 1] = the energy fraction to keep (`energy_rank`)."""
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
    if rank is None:
        R = exact
    elif isinstance(rank, float):
        R = energy_rank(lam, rank, exact)
    else:
        R = min(int(rank), exact)
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
    if key_format == "kohya":  # consumers apply (alpha / rank) * up @ down: fold rank / alpha into the pair
        stem = prefix + name.replace(".", "_")
        root = math.sqrt(R / KOHYA_ALPHA)
        return {f"{stem}.lora_down.weight": (A * root).contiguous().to(dtype),
                f"{stem}.lora_up.weight": (B * root).contiguous().to(dtype),
                f"{stem}.alpha": torch.tensor(KOHYA_ALPHA, dtype=dtype)}, None
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
    weight_bytes: int = 0
    spectra: List[Tuple[torch.Tensor, int, int]] = field(default_factory=list)  # (lam, exact rank, bytes per rank)

    def bytes_at(self, fraction: float) -> int:
        """What the pairs would weigh at an energy-fraction rank."""
        return sum(energy_rank(lam, fraction, exact) * per_rank for lam, exact, per_rank in self.spectra)


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
        itemsize = torch.empty((), dtype=dtype).element_size()
        out.weight_bytes += layer.base_module.weight.numel() * itemsize
        out.spectra.append((lam, int((lam > 0).sum()), (A.shape[1] + B.shape[0]) * itemsize))
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


def rank_argument(text: str) -> Union[int, float]:
    """A command line's LoRA rank: ``"8"`` -> 8, ``"0.99"`` -> 0.99, ``"0"`` -> 0 (exact); anything else (a word,
    NaN, inf, a negative number, a fraction above 1 such as ``1e9``) raises `argparse.ArgumentTypeError` in one
    sentence. The argparse ``type=`` of ``--rank`` (pipelines/export.py) and ``--export_lora_rank`` (trainer)."""
    import argparse
    import math

    try:
        value = int(text)
        if value >= 0:
            return value
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a LoRA rank: give 0 (exact), a positive int such as 8, "
                                         "or an energy fraction in (0, 1] such as 0.99.")
    return value


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
    _check_export_arguments(key_format, rank)
    host = as_host(source)
    if not isinstance(source, nn.Module) and host is None:
        return _export_adapter_file(source, base, out_path, rank=rank, key_format=key_format, prefix=prefix,
                                    dtype=dtype)
    report, out = LoRAExportReport(path=None), _Collected()
    if host is not None:
        method = _collect_pipeline(host, adapter_name, rank, key_format, dtype, report, out)
    else:
        name = _pick_adapter(source, adapter_name)
        prefix = _default_prefix(source, key_format) if prefix is None else prefix
        _collect(source, name, rank, key_format, prefix, dtype, report, out)
        method = adapter_configs(source)[name].method
    if key_format == "peft" and out.bias_keys and out.has_embedding:  # PEFT's lora_bias rejects Embedding targets
        for key in out.bias_keys:
            del out.tensors[key]
            module = key[len(prefix):-len(".lora_B.bias")]
            report.dropped.append(f"{module}: bias delta (PEFT cannot combine lora_bias with Embedding targets)")
        out.bias_keys = []
    report.overall_error = math.sqrt(out.dropped_sq / out.total_sq) if out.total_sq > 0 else 0.0
    if out_path is not None:
        metadata = {"format": "pt", "svdiff_tools_export": json.dumps(
            {"source_method": method, "rank": rank, "overall_relative_error": report.overall_error})}
        report.path = save_safetensors(out.tensors, _lora_file(Path(out_path), key_format, out), metadata)
    report.weight_bytes = out.weight_bytes
    report.file_bytes = report.path.stat().st_size if report.path is not None else sum(
        t.numel() * t.element_size() for t in out.tensors.values())
    if report.file_bytes > report.weight_bytes > 0:
        logger.warning("the LoRA file (%.1f MiB) is larger than the weights it modifies (%.1f MiB): a full-spectrum "
                       "delta is full rank. rank=0.99 (99%% of each layer's energy) would take %.1f MiB, rank=0.9 "
                       "%.1f MiB.", report.file_bytes / 2**20, report.weight_bytes / 2**20, out.bytes_at(0.99) / 2**20,
                       out.bytes_at(0.9) / 2**20)
    return report


def _check_export_arguments(key_format: str, rank) -> None:
    if key_format not in KEY_FORMATS:
        raise SVDAdapterError(f"key_format={key_format!r} is not supported; choose one of {', '.join(KEY_FORMATS)}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))
                             or (isinstance(rank, int) and rank < 1)
                             or (isinstance(rank, float) and not 0.0 < rank <= 1.0)):
        raise SVDAdapterError(f"rank={rank!r} must be None (exact), a positive int, or an energy fraction in (0, 1].")


def _export_adapter_file(source, base, out_path, **options) -> LoRAExportReport:
    """An adapter file exported through ``base``: loaded under a temporary name, exported, taken out again."""
    if base is None:
        raise SVDAdapterError("exporting an adapter file needs base=<the model or pipeline it was trained on>.")
    tmp_name = "svdiff_tools_export"
    base_host = as_host(base)
    if base_host is not None:
        base_host.load(source, tmp_name)
    else:
        load_adapter(base, source, adapter_name=tmp_name)
    try:
        return export_lora(base, out_path, adapter_name=tmp_name, **options)
    finally:
        if base_host is not None:
            base_host.unload(tmp_name)
        else:
            remove_adapter(base, tmp_name)


def _collect_pipeline(host: "AdapterHost", adapter_name: Optional[str], rank, key_format: str, dtype: torch.dtype,
                      report: LoRAExportReport, out: "_Collected") -> str:
    """Every component's layers of one adapter into ``out``, under the component's prefix; the adapter's method."""
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
    return next(adapter_configs(m)[name].method for m in parts.values() if name in adapter_configs(m))


def _lora_file(path: Path, key_format: str, out: "_Collected") -> Path:
    """Where the tensors go: ``path``, or for key_format "peft" and a path without suffix a PEFT folder (its
    ``adapter_config.json`` written here) holding ``adapter_model.safetensors``."""
    if key_format != "peft" or path.suffix:
        return path
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
    write_text(path / "adapter_config.json", json.dumps(config, indent=2))
    return path / "adapter_model.safetensors"
