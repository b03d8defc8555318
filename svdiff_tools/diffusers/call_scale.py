"""The per-call adapter strength, as diffusers passes it to LoRA.

``pipe(..., cross_attention_kwargs={"scale": s})`` (``joint_attention_kwargs`` on SD3/Flux) reaches the
denoiser's forward, where a pre-hook sets ``call_scale = s`` on every adapter layer and a post-hook resets
it; adapters attached to any diffusers model get these hooks. The pipeline hands the same scale to its text
encoders only through ``encode_prompt(lora_scale=s)``, so `install` also wraps the pipeline instance's
``encode_prompt``. Effective scale of an adapter = its own scale * call_scale; merged adapters are unaffected.
"""

from __future__ import annotations

import inspect

from torch import nn

from .. import model as core_model
from ..config import check_scale
from ..layer import AdapterLayerMixin
from .components import DENOISERS, TEXT_ENCODERS

SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


def set_call_scale(module: nn.Module, scale: float) -> None:
    for m in module.modules():
        if isinstance(m, AdapterLayerMixin):
            m.call_scale = scale


def _pre_hook(module, args, kwargs):
    for key in SCALE_KWARGS:
        extra = kwargs.get(key)
        if isinstance(extra, dict) and extra.get("scale") is not None:
            set_call_scale(module, check_scale(extra["scale"], f"{key}['scale']"))
            module._svd_call_scaled = True
            return None
    return None


def _post_hook(module, args, kwargs, output):
    if getattr(module, "_svd_call_scaled", False):
        set_call_scale(module, 1.0)
        module._svd_call_scaled = False
    return output


def is_diffusers_model(module: nn.Module) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(module).__mro__)


def _attach_hook(module: nn.Module) -> None:
    if is_diffusers_model(module):
        install_model_hooks(module)


def register() -> None:
    """Adapters attached to any diffusers model (by `inject_adapter` too) follow the per-call scale."""
    if _attach_hook not in core_model.ATTACH_HOOKS:
        core_model.ATTACH_HOOKS.append(_attach_hook)
        core_model.REMOVE_HOOKS.append(remove_model_hooks)


def install_model_hooks(module: nn.Module) -> None:
    """Idempotent: the pre/post forward hooks on one denoiser."""
    if not getattr(module, "_svd_scale_hooks", None):
        module._svd_scale_hooks = (
            module.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            module.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
        )


def remove_model_hooks(module: nn.Module) -> None:
    for handle in getattr(module, "_svd_scale_hooks", None) or ():
        handle.remove()
    if getattr(module, "_svd_scale_hooks", None) is not None:
        module._svd_scale_hooks = None


def install(pipe) -> None:
    """Idempotent: denoiser hooks and the ``encode_prompt`` wrapper on one pipeline instance."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            install_model_hooks(module)
    encode = getattr(pipe, "encode_prompt", None)
    if encode is None or getattr(encode, "_svd_wrapped", False):
        return
    signature = inspect.signature(encode)

    def encode_prompt(*args, **kwargs):
        try:
            scale = signature.bind_partial(*args, **kwargs).arguments.get("lora_scale")
        except TypeError:
            scale = None
        if scale is None or check_scale(scale, "lora_scale") == 1.0:
            return encode(*args, **kwargs)
        encoders = [getattr(pipe, c) for c in TEXT_ENCODERS if isinstance(getattr(pipe, c, None), nn.Module)]
        for m in encoders:
            set_call_scale(m, float(scale))
        try:
            return encode(*args, **kwargs)
        finally:
            for m in encoders:
                set_call_scale(m, 1.0)

    encode_prompt._svd_wrapped = True
    pipe.encode_prompt = encode_prompt


def remove(pipe) -> None:
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if module is not None:
            remove_model_hooks(module)
    if getattr(pipe.__dict__.get("encode_prompt"), "_svd_wrapped", False):
        del pipe.__dict__["encode_prompt"]
