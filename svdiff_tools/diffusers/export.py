"""Pipelines as `export.AdapterHost`s: ``st.export_lora(pipe, path)`` writes one LoRA file with component
prefixes (``unet.``, ``text_encoder.`` ... in diffusers keys; ``lora_unet_``, ``lora_te1_`` ... in kohya keys)."""

from __future__ import annotations

from .. import export as core_export
from ..model import adapter_configs
from .components import COMPONENTS, kohya_prefix, pipeline_components


class PipelineHost(core_export.AdapterHost):
    def __init__(self, pipe):
        self.pipe = pipe

    def components(self):
        return {c: m for c, m in pipeline_components(self.pipe).items() if adapter_configs(m)}

    def prefix(self, component, model, key_format):
        if key_format == "diffusers":
            return component + "."
        text_level = core_export._kohya_text_model_level(model) if COMPONENTS[component][0] == "text" else ""
        return kohya_prefix(self.pipe, component) + text_level

    def load(self, path, adapter_name):
        self.pipe.load_svd_adapter(path, adapter_name=adapter_name)

    def unload(self, adapter_name):
        self.pipe.delete_svd_adapters(adapter_name)


def _pipeline_host(obj):
    from diffusers import DiffusionPipeline

    return PipelineHost(obj) if isinstance(obj, DiffusionPipeline) else None


def register() -> None:
    if _pipeline_host not in core_export.HOST_FACTORIES:
        core_export.HOST_FACTORIES.append(_pipeline_host)
