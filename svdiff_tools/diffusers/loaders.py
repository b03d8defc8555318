"""Diffusers integration: after ``import svdiff_tools`` every `DiffusionPipeline` has these methods.

    pipe.load_svd_adapter(path_or_dir_or_hub_id, weight_name=None, adapter_name=None, **hub_kwargs)
    pipe.save_svd_adapter(path, adapter_name="default")
    pipe.set_svd_adapters(names, adapter_weights=None)   # weights: floats, or {component: float} dicts
    pipe.get_active_svd_adapters() / pipe.get_list_svd_adapters()
    pipe.enable_svd_adapters() / pipe.disable_svd_adapters()
    pipe.delete_svd_adapters(names)
    pipe.fuse_svd_adapter(scale=1.0, adapter_names=None) / pipe.unfuse_svd_adapter()
    pipe.merge_and_unload_svd_adapter(scale=1.0)          # fused for good, adapter layers gone (save_pretrained)
    pipe.unload_svd_adapter()

Adapters live at the weight level (`SVDLayer`), so every attention processor sees them. The per-call
strength ``pipe(..., cross_attention_kwargs={"scale": s})`` (``joint_attention_kwargs`` on SD3/Flux) scales
them as it scales LoRA: a forward pre-hook on the denoiser reads it, and a wrapper on the pipeline's
``encode_prompt(lora_scale=...)`` applies it to the text encoders. We do not register our layers as PEFT
``BaseTunerLayer``s: diffusers' LoRA verbs (``set_adapters``, ``unload_lora_weights``, ``fuse_lora``) would
then act on SVD adapters too, and a LoRA loaded beside them could no longer be managed independently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union


from ..config import check_scale
from ..errors import SVDAdapterError, SVDAdapterFileError, first_line
from ..io import (DEFAULT_WEIGHT_NAME, component_state, parse_components, prepare_load, read_adapter_file,
                 resolve_path, write_adapter_file)
from . import call_scale
from .components import pipeline_components
from ..model import (adapter_configs, adapter_layers, check_merge, disable_adapters, enable_adapters,
                    merge_adapter, merge_and_unload, remove_adapter, set_active_adapters, unmerge_adapter)



def resolve_adapter_source(source: Union[str, os.PathLike], weight_name: Optional[str] = None,
                           **hub_kwargs) -> Path:
    """A local file, a local folder (with ``weight_name`` or ``svd_adapter.safetensors``) or a Hub repo id."""
    text = str(source)
    local = text.endswith(".safetensors") or text.startswith((".", "/", "~")) or text.count("/") != 1
    if local or Path(source).expanduser().exists():
        return resolve_path(source, weight_name)
    name = weight_name or DEFAULT_WEIGHT_NAME
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(text, name, **hub_kwargs))
    except Exception as exc:
        reason = first_line(exc, 120)
        raise SVDAdapterFileError(f"{source} is neither a local file or folder nor a reachable Hub repo with {name} "
                                  f"({reason}); check the path or repo id.") from None


# ------------------------------------------------------------------------------------ the mixin methods
def _match_bare_file(path, pipe, entry) -> str:
    """A file saved from one model (component "") goes to the component that has all its modules."""
    for comp, model in pipeline_components(pipe).items():
        names = {n for n, _ in model.named_modules()}
        if set(entry.modules) <= names and set(entry.norms) <= names:
            return comp
    raise SVDAdapterFileError(f"{path} was saved from a single model whose modules match none of this "
                              f"{type(pipe).__name__}'s components; it was trained for another architecture.")


def load_svd_adapter(self, pretrained_model_name_or_path: Union[str, os.PathLike], weight_name: Optional[str] = None,
                     adapter_name: Optional[str] = None, **hub_kwargs) -> str:
    """Load an SVD adapter into this pipeline's denoiser and text encoders; returns the adapter name.

    Accepts what ``load_lora_weights`` accepts: a file, a folder (``svd_adapter.safetensors`` or
    ``weight_name``), or a Hub repo id (``hub_kwargs`` go to ``hf_hub_download``). Every component is
    checked and decomposed before any is touched; on error the pipeline is left exactly as it was.
    """
    path = resolve_adapter_source(pretrained_model_name_or_path, weight_name, **hub_kwargs)
    tensors, metadata = read_adapter_file(path)
    entries, stored_name = parse_components(path, tensors, metadata)
    if "" in entries:
        entries = {_match_bare_file(path, self, entries[""]): entries[""]}
    comps = pipeline_components(self)
    missing = sorted(c for c in entries if c not in comps)
    if missing:
        origin = metadata.get("extra", "")
        raise SVDAdapterFileError(f"{path} adapts components {missing} that this {type(self).__name__} does not "
                                  f"have; it was trained for another pipeline {origin}".rstrip() + ".")
    name = adapter_name or stored_name
    if any(name in adapter_configs(m) for m in comps.values()):
        raise SVDAdapterError(f"this pipeline already has an SVD adapter named {name!r}; pass adapter_name=.")
    prepared = [prepare_load(comps[c], entry, name, path, {}) for c, entry in entries.items()]
    committed = []
    try:
        for p in prepared:
            p.commit()
            committed.append(p)
    except BaseException:
        for p in committed:
            remove_adapter(p.model, p.name)
        raise
    call_scale.install(self)
    return name


def save_svd_adapter(self, save_path: Union[str, os.PathLike], adapter_name: str = "default") -> Path:
    """One file with every component's part of ``adapter_name`` (``unet.``, ``text_encoder.``, ... prefixes)."""
    parts = {c: component_state(m, adapter_name) for c, m in pipeline_components(self).items()
             if adapter_name in adapter_configs(m)}
    if not parts:
        raise SVDAdapterError(f"this pipeline has no SVD adapter named {adapter_name!r}.")
    extra = {"pipeline_class": type(self).__name__, "base_model": str(getattr(self, "name_or_path", "") or "")}
    return write_adapter_file(save_path, parts, adapter_name, extra)


def get_list_svd_adapters(self) -> Dict[str, List[str]]:
    """``{component: [adapter names]}``."""
    return {c: list(adapter_configs(m)) for c, m in pipeline_components(self).items() if adapter_configs(m)}


def get_active_svd_adapters(self) -> List[str]:
    active = []
    for model in pipeline_components(self).values():
        for _, layer in adapter_layers(model):
            active += [n for n in layer.active_adapters if n not in active]
    return active


def _known(self, names) -> List[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = {n for ns in get_list_svd_adapters(self).values() for n in ns}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SVDAdapterError(f"no SVD adapter named {unknown[0]!r}; this pipeline has {sorted(known)}.")
    return names


def set_svd_adapters(self, adapter_names: Union[str, List[str]],
                     adapter_weights: Optional[Union[float, Dict[str, float], List]] = None) -> None:
    """Activate exactly these adapters with these weights (a float each, or ``{component: float}``)."""
    names = _known(self, adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise SVDAdapterError(f"got {len(weights)} adapter_weights for {len(names)} adapters; pass one each.")
    for comp, model in pipeline_components(self).items():
        present = [(n, w) for n, w in zip(names, weights) if n in adapter_configs(model)]
        per = [check_scale(w.get(comp, 1.0) if isinstance(w, dict) else (1.0 if w is None else w), "adapter_weights")
               for _, w in present]
        if adapter_configs(model):
            set_active_adapters(model, [n for n, _ in present], per)


def enable_svd_adapters(self) -> None:
    for model in pipeline_components(self).values():
        enable_adapters(model)


def disable_svd_adapters(self) -> None:
    for model in pipeline_components(self).values():
        disable_adapters(model)


def delete_svd_adapters(self, adapter_names: Union[str, Iterable[str]]) -> None:
    for name in _known(self, adapter_names):
        for model in pipeline_components(self).values():
            if name in adapter_configs(model):
                remove_adapter(model, name)


def fuse_svd_adapter(self, scale: float = 1.0, adapter_names: Optional[List[str]] = None,
                     components: Optional[List[str]] = None) -> None:
    """Merge the (active, or named) adapters into the weights: ``W += scale * weight * U M V^T``."""
    names = _known(self, adapter_names) if adapter_names is not None else None
    todo = []
    for comp, model in pipeline_components(self).items():
        if components is None or comp in components:
            present = None if names is None else [n for n in names if n in adapter_configs(model)]
            if adapter_configs(model) and (present is None or present):
                todo.append((model, present))
    for model, present in todo:  # every component checked before any is fused
        check_merge(model, present, scale)
    for model, present in todo:
        merge_adapter(model, present, scale=scale)


def merge_and_unload_svd_adapter(self, scale: float = 1.0, adapter_names: Optional[List[str]] = None) -> None:
    """Fuse the (active, or named) adapters into the weights for good and remove the adapter layers: the pipeline
    is a plain pipeline with the adapted weights, which ``save_pretrained`` writes for tools that read only full
    weights. Every component is checked before any is changed."""
    names = _known(self, adapter_names) if adapter_names is not None else None
    todo = [(m, None if names is None else [n for n in names if n in adapter_configs(m)])
            for m in pipeline_components(self).values() if adapter_configs(m)]
    todo = [(m, present) for m, present in todo if present is None or present]
    for model, present in todo:
        check_merge(model, present, scale)
    for model, present in todo:
        merge_and_unload(model, present, scale=scale)
    for model in pipeline_components(self).values():  # adapters of other names go too
        remove_adapter(model)
    call_scale.remove(self)


def unfuse_svd_adapter(self, components: Optional[List[str]] = None) -> None:
    for comp, model in pipeline_components(self).items():
        if (components is None or comp in components) and adapter_configs(model):
            unmerge_adapter(model)


def unload_svd_adapter(self) -> None:
    """Remove every SVD adapter; the original modules come back."""
    for model in pipeline_components(self).values():
        remove_adapter(model)
    call_scale.remove(self)


MIXIN_METHODS = {f.__name__: f for f in (
    load_svd_adapter, save_svd_adapter, get_list_svd_adapters, get_active_svd_adapters, set_svd_adapters,
    enable_svd_adapters, disable_svd_adapters, delete_svd_adapters, fuse_svd_adapter, unfuse_svd_adapter,
    merge_and_unload_svd_adapter,
    unload_svd_adapter)}
