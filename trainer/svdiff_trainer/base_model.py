"""The base model a run trains on: where it is, which family it belongs to, and its frozen parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .args import TrainingInputError
from .config import ModelConfig, RunConfig


def embedded_preset(model: ModelConfig):
    """The run's embedded base (a `presets.Preset`), or None for a named model."""
    from .presets import choose

    return choose(model.embedded_kind) if model.embedded_kind is not None else None


def resolve_base(model: ModelConfig) -> str:
    """The base's diffusers folder or hub id: the embedded preset's folder when no model was named."""
    preset = embedded_preset(model)
    return str(preset.pipeline_folder()) if preset is not None else model.pretrained_model_name_or_path


def pipeline_class_name(model: ModelConfig, base: str) -> str:
    """The base's pipeline class from its model_index.json; refuses families this trainer does not handle."""
    from diffusers import DiffusionPipeline

    try:
        cls = DiffusionPipeline.load_config(base, revision=model.revision).get("_class_name", "")
    except Exception as exc:
        raise TrainingInputError(f"{base} is not a diffusers model folder or reachable hub id "
                                 f"({type(exc).__name__}); check --pretrained_model_name_or_path.") from None
    if "3" in cls or "Flux" in cls:
        raise TrainingInputError(f"{base} is a {cls}; this trainer handles Stable Diffusion 1.x/2.x and SDXL bases.")
    return cls


def text_encoder_classes(sdxl: bool) -> dict:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {"text_encoder": CLIPTextModel, **({"text_encoder_2": CLIPTextModelWithProjection} if sdxl else {})}


def weightless_models(cfg: RunConfig, base: str, sdxl: bool):
    """(UNet, [text encoders if trained]) built from the configs on the meta device: for checks only."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet",
                                                                                 revision=cfg.model.revision))
        encoders = [cls(CLIPTextConfig.from_pretrained(base, subfolder=name, revision=cfg.model.revision))
                    for name, cls in text_encoder_classes(sdxl).items()] if cfg.method.train_text_encoder else []
    return unet, encoders


def load_pipeline(model: ModelConfig, base: str, pipeline_cls: str, **components):
    from diffusers import DiffusionPipeline

    extra = {} if "XL" in pipeline_cls else {"safety_checker": None}
    components.setdefault("torch_dtype", torch.float32)  # transformers would keep an fp16 checkpoint's text encoder fp16
    return DiffusionPipeline.from_pretrained(base, revision=model.revision, variant=model.variant, **extra,
                                             **components)


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class BaseModels:
    """The frozen parts of the base pipeline, on the device, in the weight dtype."""

    tokenizers: List
    noise_scheduler: object
    encoders: Dict[str, torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    sdxl: bool
    weight_dtype: torch.dtype


def load_base_models(cfg: RunConfig, base: str, sdxl: bool, device, weight_dtype: torch.dtype) -> BaseModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    load = dict(revision=cfg.model.revision)
    classes = text_encoder_classes(sdxl)
    tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=n.replace("text_encoder", "tokenizer"),
                                                use_fast=False, **load) for n in classes]
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **load)
    encoders = {n: cls.from_pretrained(base, subfolder=n, variant=cfg.model.variant, **load)
                for n, cls in classes.items()}
    vae_path = cfg.model.pretrained_vae_model_name_or_path
    vae = AutoencoderKL.from_pretrained(vae_path or base, subfolder=None if vae_path else "vae", **load)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=cfg.model.variant, **load)
    for model in (vae, *encoders.values(), unet):  # also an fp16 checkpoint trains in fp32 without mixed precision
        model.requires_grad_(False)
        model.to(device)
        if next(model.parameters()).dtype != weight_dtype:
            model.to(dtype=weight_dtype)
    if cfg.optim.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    return BaseModels(tokenizers, noise_scheduler, encoders, vae, unet, sdxl, weight_dtype)


class PromptEncoder:
    """``(prompt embeddings, pooled embeddings or None)`` for a list of prompts; SDXL: penultimate hidden
    states of both encoders concatenated, pooled from the second (projection) encoder."""

    def __init__(self, tokenizers: List, encoders: Dict[str, torch.nn.Module], sdxl: bool, device):
        self.tokenizers, self.encoders, self.sdxl, self.device = tokenizers, encoders, sdxl, device

    def __call__(self, prompts: List[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden, pooled = [], None
        for tokenizer, model in zip(self.tokenizers, self.encoders.values()):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            if not self.sdxl:
                return model(ids)[0], None
            out = model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled
