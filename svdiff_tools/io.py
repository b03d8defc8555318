"""Adapter files: one ``.safetensors`` with the trainable tensors and JSON metadata.

One file holds one adapter for one model or for several components of a pipeline.

Tensors: ``[<component>.]<module name>.<tensor>`` (``delta``, ``values``/``rows``/``cols`` for SVFT,
``bias_delta``, ``weight_delta`` for norms); a bare model is the component ``""`` (no prefix).
Metadata (all strings): ``format``, ``format_version``, ``adapter_name``, ``library_version``,
``conv_reshape``, ``checksums`` (JSON ``{tensor: blake2b of its dtype, shape and bytes}``, version 2),
``checksum`` (blake2b of every other metadata entry as canonical JSON, version 3: it covers the config, the
module records and, through ``checksums``, the payload, so any edit is refused) and
``components``: JSON ``{component: {"config": the full SVDAdapterConfig, "modules": {name: kind, weight
shape, rank, decomposition driver and rank, decomposed weight dtype, base-weight fingerprint},
"norm_modules": {...}}}``, plus any ``extra`` the caller adds. Loading checks everything before touching a
model (checksums, metadata types, tensor names, shapes, dtypes and values) and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from torch import nn

from . import decomposition as dec
from .atomic import save_safetensors
from .cache import weight_digest
from .config import SVDAdapterConfig
from .errors import SVDAdapterError, SVDAdapterFileError, first_line
from .fingerprint import fingerprint, mismatch
from .layer import NormDeltaLayer, SVDLayer
from .model import (ModuleRecord, PlannedAdapter, adapter_configs, adapter_layers, adapter_parameters,
                    attach_planned, build_planned, check_adapter_name, remove_adapter)
from .module_kinds import is_norm, kind_of
from .targets import base_of

FORMAT = "svdiff-tools.adapter"
FORMAT_VERSION = 3  # 2: per-tensor checksums; 3: one checksum over all metadata (1 and 2 load with a warning)
DEFAULT_WEIGHT_NAME = "svd_adapter.safetensors"
CONV_RESHAPE = "weight.reshape(out_channels, -1): out x (in/groups*prod(kernel)), PyTorch's row-major order"
RUNTIME_OPTIONS = ("svd_dtype", "forward_mode", "basis_storage", "scale")
logger = logging.getLogger(__name__)


def checksums(tensors: Dict[str, torch.Tensor]) -> str:
    """JSON ``{name: digest}`` of every tensor (dtype, shape and exact bytes)."""
    return json.dumps({k: weight_digest(v) for k, v in sorted(tensors.items())}, sort_keys=True)


def json_digest(data) -> str:
    """blake2b of ``data`` (JSON-serialisable) as canonical JSON: sorted keys, no spaces."""
    return hashlib.blake2b(json.dumps(data, sort_keys=True, separators=(",", ":")).encode(), digest_size=20).hexdigest()


def metadata_checksum(metadata: Dict[str, str]) -> str:
    """`json_digest` of every metadata entry but ``checksum`` itself."""
    return json_digest({k: v for k, v in metadata.items() if k != "checksum"})


def component_state(model: nn.Module, adapter_name: str = "default") -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata entry) of one adapter of one model, as `save_adapter` writes them."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise SVDAdapterError(f"the model has no adapter named {adapter_name!r} (it has {list(configs)}).")
    return layers_state(adapter_layers(model), configs[adapter_name], adapter_name)


def layers_state(layers, config: SVDAdapterConfig, adapter_name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors, metadata entry) of ``adapter_name`` on ``(module name, adapter layer)`` pairs."""
    tensors, modules, norms = {}, {}, {}
    for name, layer in layers:
        if isinstance(layer, SVDLayer) and adapter_name in layer.svd_adapters:
            method = layer.svd_adapters[adapter_name]
            basis = layer.bases[layer.basis_of[adapter_name]]
            for tname, t in method.state_dict().items():
                tensors[f"{name}.{tname}"] = t.detach().to("cpu").contiguous()
            modules[name] = {
                "kind": layer.kind.name,
                "weight_shape": list(layer.base_module.weight.shape),
                "rank": method.rank,
                "driver": basis.driver,
                "svd_rank": basis.svd_rank,
                "weight_dtype": str(basis.weight_dtype).replace("torch.", ""),
                "fingerprint": fingerprint(layer.unmerged_weight()),
            }
        elif isinstance(layer, NormDeltaLayer) and adapter_name in layer.weight_deltas:
            tensors[f"{name}.weight_delta"] = layer.weight_deltas[adapter_name].detach().to("cpu").contiguous()
            norms[name] = {"weight_shape": list(layer.base_module.weight.shape),
                           "fingerprint": fingerprint(layer.unmerged_weight())}
    return tensors, {"config": config.to_dict(), "modules": modules, "norm_modules": norms}


def write_adapter_file(path: Union[str, os.PathLike], components: Dict[str, Tuple[Dict[str, torch.Tensor], dict]],
                       adapter_name: str, extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``{component: (tensors, entry)}`` to one file (atomically). ``path`` may be a folder."""
    from .version import __version__

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / DEFAULT_WEIGHT_NAME
    tensors = {}
    for comp, (comp_tensors, _) in components.items():
        tensors.update({(f"{comp}.{k}" if comp else k): v for k, v in comp_tensors.items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "adapter_name": adapter_name,
        "conv_reshape": CONV_RESHAPE,
        "components": json.dumps({comp: entry for comp, (_, entry) in components.items()}, sort_keys=True),
        "library_version": __version__,
        "checksums": checksums(tensors),
    }
    if extra_metadata:
        metadata["extra"] = json.dumps(extra_metadata, sort_keys=True)
    metadata["checksum"] = metadata_checksum(metadata)
    save_safetensors(tensors, path, metadata)
    return path


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default",
                 extra_metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``adapter_name`` to ``path`` (a file, or a folder that gets ``svd_adapter.safetensors``).

    The file is written to a temporary name and renamed into place, so a crash never leaves half a file.
    """
    return write_adapter_file(path, {"": component_state(model, adapter_name)}, adapter_name, extra_metadata)


# ----------------------------------------------------------------------------------- reading
def resolve_path(path: Union[str, os.PathLike], weight_name: Optional[str] = None) -> Path:
    """A local adapter file, or ``weight_name`` (default ``svd_adapter.safetensors``) inside a folder."""
    path = Path(path).expanduser()
    name = weight_name or DEFAULT_WEIGHT_NAME
    if path.is_dir():
        if (path / name).is_file():
            return path / name
        raise SVDAdapterFileError(f"folder {path} has no {name}; pass the adapter file itself or weight_name=.")
    if not path.is_file():
        raise SVDAdapterFileError(f"adapter file {path} does not exist; check the path.")
    return path


def read_adapter_file(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a safetensors file, with one-sentence errors for unreadable files."""
    path = resolve_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        reason = first_line(exc)
        raise SVDAdapterFileError(
            f"{path} is not a readable safetensors file ({reason}); it may be truncated, corrupt or in another "
            "format: re-save or re-download it."
        ) from None
    return tensors, metadata


@dataclass
class ComponentEntry:
    """One component of an adapter file: its config, module records and (unprefixed) tensors."""

    config: SVDAdapterConfig
    modules: dict
    norms: dict
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)


def parse_components(path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]
                     ) -> Tuple[Dict[str, ComponentEntry], str]:
    """({component: entry}, adapter_name) from an adapter file, or a one-sentence error."""
    if metadata.get("format") != FORMAT:
        if any(("lora_A" in k or "lora_down" in k or "lora_up" in k or "lora_B" in k) for k in tensors):
            raise SVDAdapterFileError(f"{path} is a LoRA file, not an SVD adapter; load it with diffusers' "
                                      "load_lora_weights or PEFT instead.")
        raise SVDAdapterFileError(f"{path} is not an svdiff-tools adapter (its metadata has no "
                                  f"format={FORMAT!r}); save adapters with save_adapter().")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = -1
    if version < 1 or version > FORMAT_VERSION:
        raise SVDAdapterFileError(f"{path} has adapter format version {metadata.get('format_version')!r}, but this "
                                  f"svdiff-tools reads versions 1-{FORMAT_VERSION}; upgrade svdiff-tools.")
    if version >= 3 and metadata.get("checksum") != metadata_checksum(metadata):
        raise SVDAdapterFileError(f"{path}: its metadata fails its checksum (a field such as the scale, rank or "
                                  "decomposition was edited, or the file is damaged); re-save the adapter from its "
                                  "model or re-download it.")
    if version < 3:
        _warn_unchecked_metadata(path, version)
    if version >= 2:
        _verify_checksums(path, tensors, metadata.get("checksums"))
    try:
        raw = json.loads(metadata["components"])
        if not isinstance(raw, dict) or not all(isinstance(e, dict) for e in raw.values()):
            raise TypeError("components is not an object of objects")
        entries = {comp: ComponentEntry(SVDAdapterConfig.from_dict(e["config"]), dict(e["modules"]),
                                        dict(e.get("norm_modules", {}))) for comp, e in raw.items()}
    except SVDAdapterError as exc:
        raise SVDAdapterFileError(f"{path} has damaged metadata (its config: {exc}); re-save the adapter.") from None
    except Exception as exc:
        raise SVDAdapterFileError(f"{path} has damaged metadata ({type(exc).__name__}); re-save the adapter.") from None
    for comp, entry in entries.items():
        for name, info in entry.modules.items():
            problem = _module_record_problem(info)
            if problem:
                raise SVDAdapterFileError(f"{path} has damaged metadata for module {name} ({problem}); "
                                          "re-save the adapter.")
        for name, info in entry.norms.items():
            problem = _fingerprint_problem(info.get("fingerprint") if isinstance(info, dict) else None)
            if problem:
                raise SVDAdapterFileError(f"{path} has damaged metadata for norm {name} ({problem}); "
                                          "re-save the adapter.")
    if not any(e.modules or e.norms for e in entries.values()):
        raise SVDAdapterFileError(f"{path} adapts no module (an empty adapter); re-save it from a model with an "
                                  "injected adapter.")
    for key, value in tensors.items():
        comp = next((c for c in entries if c and key.startswith(c + ".")), "" if "" in entries else None)
        if comp is None:
            raise SVDAdapterFileError(f"{path} holds tensor {key} that belongs to no component; the file is damaged "
                                      "or foreign: re-save it.")
        entries[comp].tensors[key[len(comp) + 1:] if comp else key] = value
    return entries, metadata.get("adapter_name", "default")


_warned_unchecked: set = set()


def _warn_unchecked_metadata(path, version: int) -> None:
    """Once per file: a version 1/2 file's config and module records carry no checksum."""
    if str(path) not in _warned_unchecked:
        _warned_unchecked.add(str(path))
        logger.warning("%s is an adapter file of format version %d, whose config and module records no checksum "
                       "covers (an edit to them would go unnoticed); re-save it with this svdiff-tools to protect it.",
                       path, version)


def _verify_checksums(path, tensors: Dict[str, torch.Tensor], recorded: Optional[str]) -> None:
    try:
        expected = json.loads(recorded) if recorded is not None else None
    except ValueError:
        expected = None
    if not isinstance(expected, dict):
        raise SVDAdapterFileError(f"{path} lacks its tensor checksums; the file is damaged: re-save it.")
    if set(expected) != set(tensors):
        extra = sorted(set(tensors) ^ set(expected))[0]
        raise SVDAdapterFileError(f"{path} does not hold the tensors its checksums list (e.g. {extra}); the file "
                                  "is damaged: re-save it.")
    for key in sorted(tensors):
        if weight_digest(tensors[key]) != expected[key]:
            raise SVDAdapterFileError(f"{path}: tensor {key} fails its checksum; the file is damaged (a changed "
                                      "byte on disk or in transfer): re-download or re-save it.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fingerprint_problem(fp) -> Optional[str]:
    """What is wrong with a base-weight fingerprint record, or None."""
    if not isinstance(fp, dict):
        return "no fingerprint"
    shape, samples = fp.get("shape"), fp.get("samples")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return "fingerprint shape"
    numbers = [fp.get("norm"), fp.get("sum")] + (samples if isinstance(samples, list) else [None])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        return "fingerprint values are not finite numbers"
    from .fingerprint import SAMPLES

    if len(samples) != min(SAMPLES, math.prod(shape)):
        return "fingerprint samples"
    return None


def _module_record_problem(info) -> Optional[str]:
    """What is wrong with one module record of the metadata (types and ranges), or None."""
    if not isinstance(info, dict):
        return "not an object"
    if not _is_int(info.get("rank")) or info["rank"] < 0:
        return f"rank {info.get('rank')!r}"
    if info.get("driver") not in dec.DRIVERS:
        return f"decomposition {info.get('driver')!r}"
    svd_rank = info.get("svd_rank")
    if (info["driver"] == "randomized" or svd_rank is not None) and not (_is_int(svd_rank) and svd_rank >= 1):
        return f"svd_rank {svd_rank!r}"
    if info.get("weight_dtype") not in _DTYPES:
        return f"weight_dtype {info.get('weight_dtype')!r}"
    shape = info.get("weight_shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        return f"weight_shape {shape!r}"
    return _fingerprint_problem(info.get("fingerprint"))


def _module_at(path, model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SVDAdapterFileError(f"{path} adapts {what} {name}, which this model does not have; it was trained "
                                  "for another architecture.") from None


def _check_fingerprint(path, name: str, info: dict, weight: torch.Tensor, what: str) -> None:
    reason = mismatch(info["fingerprint"], weight)
    if reason is not None:
        raise SVDAdapterFileError(f"{path} was trained on another base model: {what} {name} differs ({reason}); "
                                  "load it into the base model it was trained on.")


def _check_against_model(path, model: nn.Module, modules: dict, norms: dict, tensors: Dict[str, torch.Tensor],
                         adapter_name: str) -> None:
    """Every check that needs no decomposition: names, kinds, shapes, fingerprints, tensor keys."""
    owned = set()
    for name, info in modules.items():
        module = _module_at(path, model, name, "module")
        base = base_of(module)
        kind = kind_of(base)
        if kind is None or kind.name != info.get("kind"):
            raise SVDAdapterFileError(f"{path} expects a {info.get('kind')} layer at {name}, but this model has "
                                      f"{type(base).__name__}; it was trained for another architecture.")
        _check_fingerprint(path, name, info, module.unmerged_weight() if isinstance(module, SVDLayer)
                           else base.weight, "module")
        owned |= {k for k in tensors if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
    for name, info in norms.items():
        module = _module_at(path, model, name, "norm")
        base = base_of(module)
        if not is_norm(base):
            raise SVDAdapterFileError(f"{path} expects a norm layer at {name}; it was trained for another "
                                      "architecture.")
        _check_fingerprint(path, name, info, module.unmerged_weight() if isinstance(module, NormDeltaLayer)
                           else base.weight, "norm")
        key = f"{name}.weight_delta"
        if key not in tensors or list(tensors[key].shape) != list(base.weight.shape):
            raise SVDAdapterFileError(f"{path} lacks a well-shaped {key}; the file is damaged: re-save it.")
        owned.add(key)
    stray = sorted(set(tensors) - owned)
    if stray:
        raise SVDAdapterFileError(f"{path} holds tensor {stray[0]} that belongs to no adapted module; the file is "
                                  "damaged or foreign: re-save it.")


def _check_tensors(path, plans: List[PlannedAdapter], tensors: Dict[str, torch.Tensor], norms: dict) -> None:
    """The file's tensors against the freshly built methods: exactly the expected names, well-shaped,
    of the expected kind of dtype (floating deltas, integer indices), finite, in range."""
    expected = {f"{n}.weight_delta" for n in norms}
    for plan in plans:
        expected |= {f"{plan.name}.{t}" for t in plan.method.state_dict()}
    stray = sorted(set(tensors) - expected)
    if stray:
        raise SVDAdapterFileError(f"{path} holds tensor {stray[0]} that belongs to no adapted module; the file is "
                                  "damaged or foreign: re-save it.")
    for n in norms:
        got = tensors[f"{n}.weight_delta"]
        if not got.is_floating_point() or got.dtype not in _DTYPES.values() or not torch.isfinite(got).all():
            raise SVDAdapterFileError(f"{path}: tensor {n}.weight_delta is not a finite floating tensor; the file "
                                      "is damaged or the run diverged: use an earlier checkpoint.")
    for plan in plans:
        check_method_state(path, plan.name, plan.method,
                           {t: tensors.get(f"{plan.name}.{t}") for t in plan.method.state_dict()})


def check_method_state(path, name: str, method: nn.Module, state: Dict[str, Optional[torch.Tensor]]) -> None:
    """One module's tensors read from ``path`` against its freshly built ``method``: present, the same shape, the
    same kind of dtype (a supported floating dtype for deltas, integer for indices), finite, in range
    (`SpectralMethod.state_problem`); else `SVDAdapterFileError` naming ``path`` and the tensor."""
    for tname, t in method.state_dict().items():
        key, got = f"{name}.{tname}", state.get(tname)
        if got is None or got.shape != t.shape:
            have = None if got is None else list(got.shape)
            raise SVDAdapterFileError(f"{path}: tensor {key} has shape {have}, expected {list(t.shape)}; "
                                      "the file is damaged or for another base model.")
        if got.is_floating_point() != t.is_floating_point() or (got.is_floating_point()
                                                                and got.dtype not in _DTYPES.values()):
            want = f"a {', '.join(_DTYPES)} tensor" if t.is_floating_point() else "an integer tensor"
            raise SVDAdapterFileError(f"{path}: tensor {key} has dtype {got.dtype}, expected {want}; the file is "
                                      "damaged or foreign.")
        if torch.is_floating_point(got) and not torch.isfinite(got).all():
            raise SVDAdapterFileError(f"{path}: tensor {key} holds NaN or inf; the training run diverged, "
                                      "use an earlier checkpoint.")
    problem = method.state_problem(state)
    if problem:
        raise SVDAdapterFileError(f"{path}: module {name}: {problem}; the file is damaged.")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _warn_on_lossy_basis(model: nn.Module, config: SVDAdapterConfig, records: dict) -> None:
    """Warn once when the model's weights are less precise than those the adapter was trained on.

    The training basis cannot be rebuilt from rounded weights, and the rounding (bf16: ~0.4% of each weight)
    is as large as a typical adapter's change. Measured on 384x384 and 1536x384 weights with a decaying
    spectrum, svdiff adapter, fp32 -> bf16 (tests/test_reliability.py::test_bf16_load_is_as_good_as_casting):
    the adapter's effect is reproduced to 4-5%, as casting the adapted fp32 model to bf16 gives (5-6%); the
    weights to 0.25-0.27% (cast: 0.17%). Off-diagonal SVFT entries also meet slightly rotated vectors."""
    for name, record in records.items():
        trained = record.weight_dtype
        module = model.get_submodule(name)
        weight = getattr(module, "base_module", module).weight
        if trained is not None and torch.finfo(weight.dtype).eps > torch.finfo(trained).eps:
            t, w = str(trained).replace("torch.", ""), str(weight.dtype).replace("torch.", "")
            logger.warning("adapter was trained on %s weights but %s is %s: it acts on a basis rebuilt from rounded "
                           "weights, so its effect is reproduced only to about that rounding (as casting the adapted "
                           "%s model to %s would); load the model in %s for exact outputs.", t, name, w, t, w, t)
            return


@dataclass
class PreparedLoad:
    """An adapter checked and built for one model, not yet attached: `commit` attaches it."""

    model: nn.Module
    name: str
    config: SVDAdapterConfig
    plans: List[PlannedAdapter]
    entry: ComponentEntry
    is_trainable: bool

    def commit(self) -> str:
        attach_planned(self.model, self.plans, self.config, self.name, list(self.entry.norms))
        try:
            with torch.no_grad():
                for plan in self.plans:
                    method = plan.method
                    method.load_state_dict({t: self.entry.tensors[f"{plan.name}.{t}"] for t in method.state_dict()})
                for n in self.entry.norms:
                    self.model.get_submodule(n).weight_deltas[self.name].copy_(self.entry.tensors[f"{n}.weight_delta"])
            for p in adapter_parameters(self.model, self.name).values():
                p.requires_grad_(self.is_trainable)
        except BaseException:
            remove_adapter(self.model, self.name)
            raise
        return self.name


def prepare_load(model: nn.Module, entry: ComponentEntry, name: str, path, runtime_options: dict,
                 is_trainable: bool = False) -> PreparedLoad:
    """Every check and every decomposition for loading ``entry`` into ``model``, without touching it."""
    bad = sorted(set(runtime_options) - set(RUNTIME_OPTIONS))
    if bad:
        raise SVDAdapterError(f"load options {bad} are unknown; allowed: {', '.join(RUNTIME_OPTIONS)}.")
    config = entry.config.replace(**runtime_options) if runtime_options else entry.config
    check_adapter_name(model, name)
    _check_against_model(path, model, entry.modules, entry.norms, entry.tensors, name)
    records = {n: ModuleRecord(int(m["rank"]), m["driver"], m.get("svd_rank"), _DTYPES.get(m.get("weight_dtype")))
               for n, m in entry.modules.items()}
    _warn_on_lossy_basis(model, config, records)
    plans = build_planned(model, config, name, records=records)
    _check_tensors(path, plans, entry.tensors, entry.norms)
    return PreparedLoad(model, name, config, plans, entry, is_trainable)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: Optional[str] = None, *,
                 component: Optional[str] = None, is_trainable: bool = False, **runtime_options) -> str:
    """Load an adapter file into ``model`` and return the adapter's name.

    ``component`` picks one part of a pipeline adapter file ("unet", "text_encoder", ...).
    ``runtime_options`` may override ``svd_dtype``, ``forward_mode``, ``basis_storage`` and ``scale``.
    Everything is checked (format, architecture, base-model fingerprints, tensor shapes) before the model is
    touched; on any error the model is left exactly as it was.
    """
    tensors, metadata = read_adapter_file(path)
    entries, stored_name = parse_components(path, tensors, metadata)
    if component is None:
        if "" not in entries:
            raise SVDAdapterError(f"{path} is a pipeline adapter with components {sorted(entries)}; load it with "
                                  "pipe.load_svd_adapter(), or pass component= to load one part.")
        component = ""
    elif component not in entries:
        raise SVDAdapterError(f"{path} has no component {component!r}; it has {sorted(entries)}.")
    return prepare_load(model, entries[component], adapter_name or stored_name, path, runtime_options,
                        is_trainable).commit()
