"""The PEFT route's file guarantees, equal to those of `svdiff_tools.save_adapter` files.

PEFT writes ``adapter_model.safetensors`` with no metadata of ours, so the seal lives in ``adapter_config.json``
(`config.SVDPeftConfig`): on saving, `record_checksums` puts a digest of every tensor of this method, keyed as the
file keys it (without the adapter name and ``base_model.model.``), into the config's ``tensor_checksums``; the
config's ``checksum`` covers those digests, the base fingerprints and every field that changes the effect.

On loading, `verify_state` runs before PEFT copies a single value: every tensor of every tuner layer is present,
well-shaped, of a supported floating (or integer, for SVFT's indices) dtype, finite and in range; every floating
tensor of the file is finite; and, for a config read from a file (sealed), each tensor matches its recorded digest
and the file holds exactly the recorded tensors. Any failure raises `SVDAdapterFileError` in one sentence and
`rollback` takes the adapter out again, so the model is left as it was.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..cache import weight_digest
from ..errors import SVDAdapterFileError
from ..io import check_method_state
from .layer import SVDTunerLayer

PEFT_PREFIX = "base_model.model."


def file_key(key: str) -> str:
    """A state-dict key as PEFT's weights file keys it, without the ``base_model.model.`` wrapper prefix."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def record_checksums(config, state: Dict[str, torch.Tensor]) -> None:
    """``config.tensor_checksums = {file key: digest}`` of ``state`` (the method's tensors, adapter name removed)."""
    config.tensor_checksums = {file_key(k): weight_digest(v) for k, v in sorted(state.items())}


def _tuner_layers(model: nn.Module, adapter_name: str):
    for name, module in model.named_modules():
        if isinstance(module, SVDTunerLayer) and adapter_name in module.core.svd_adapters:
            yield name, module


def verify_state(model: nn.Module, config, adapter_name: str, state_dict: Dict[str, torch.Tensor]) -> None:
    """Refuse ``state_dict`` (as read from the weights file) for ``adapter_name`` unless it is intact and fits."""
    where = getattr(config, "_source", None) or "the PEFT adapter being loaded"
    tensors = {file_key(k): v for k, v in state_dict.items()}
    expected, prefix_marks = set(), set()
    for name, layer in _tuner_layers(model, adapter_name):
        name = file_key(name)
        method = layer.core.svd_adapters[adapter_name]
        keys = {t: f"{name}.{layer.prefix}adapters.{t}" for t in method.state_dict()}
        missing = sorted(k for k in keys.values() if k not in tensors)
        if missing:
            raise SVDAdapterFileError(f"{where} lacks tensor {missing[0]} of an adapted module; the weights file "
                                      "is damaged or belongs to another config: re-save the adapter.")
        check_method_state(where, f"{name}.{layer.prefix}adapters", method, {t: tensors[k] for t, k in keys.items()})
        expected |= set(keys.values())
        prefix_marks.add(f".{layer.prefix}adapters.")
    stray = sorted(k for k in tensors if k not in expected and any(m in k for m in prefix_marks))
    if stray:
        raise SVDAdapterFileError(f"{where} holds tensor {stray[0]} that belongs to no adapted module; the file is "
                                  "damaged or its config was edited: re-save the adapter.")
    for key, value in sorted(tensors.items()):
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise SVDAdapterFileError(f"{where}: tensor {key} holds NaN or inf; the training run diverged, use an "
                                      "earlier checkpoint.")
    if getattr(config, "_sealed", False):
        recorded = config.tensor_checksums
        if set(recorded) != expected:
            odd = sorted(set(recorded) ^ expected)
            raise SVDAdapterFileError(f"{where} does not hold the tensors its config records (e.g. {odd[0]}); the "
                                      "weights file and adapter_config.json do not belong together: re-save the "
                                      "adapter.")
        for key in sorted(expected):
            if weight_digest(tensors[key]) != recorded[key]:
                raise SVDAdapterFileError(f"{where}: tensor {key} fails its checksum; the weights file is damaged "
                                          "(a changed byte on disk or in transfer): re-download or re-save it.")


def rollback(model: nn.Module, adapter_name: str) -> None:
    """Take ``adapter_name`` out of every SVD tuner layer under ``model``; a layer left without adapters is replaced
    by its base layer again, and a PEFT model forgets the adapter's config."""
    for name, layer in list(_tuner_layers(model, adapter_name)):
        if len(layer.core.svd_adapters) > 1:
            layer.delete_adapter(adapter_name)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
