"""The one table of diffusers pipeline components that adapters reach, and what each is called in files."""

from __future__ import annotations

from typing import Dict

from torch import nn

# component -> (role, kohya prefix; for text encoders, the prefix when the pipeline has a second text encoder)
COMPONENTS = {
    "unet": ("denoiser", "lora_unet_"),
    "transformer": ("denoiser", "lora_transformer_"),
    "text_encoder": ("text", ("lora_te_", "lora_te1_")),
    "text_encoder_2": ("text", ("lora_te2_", "lora_te2_")),
    "text_encoder_3": ("text", ("lora_te3_", "lora_te3_")),
}
DENOISERS = tuple(c for c, (role, _) in COMPONENTS.items() if role == "denoiser")
TEXT_ENCODERS = tuple(c for c, (role, _) in COMPONENTS.items() if role == "text")


def pipeline_components(pipe) -> Dict[str, nn.Module]:
    """The adaptable components a pipeline has (denoiser and text encoders)."""
    return {c: getattr(pipe, c) for c in COMPONENTS if isinstance(getattr(pipe, c, None), nn.Module)}


def kohya_prefix(pipe, component: str) -> str:
    """``lora_unet_``, ``lora_te_`` (``lora_te1_`` beside a second text encoder), ``lora_te2_``, ..."""
    role, prefix = COMPONENTS[component]
    if role == "denoiser":
        return prefix
    return prefix[1] if getattr(pipe, "text_encoder_2", None) is not None else prefix[0]
