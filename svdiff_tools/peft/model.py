"""The PEFT tuner models: `BaseTuner`s that replace targeted modules with `SVDTunerLayer`s."""

from __future__ import annotations

from typing import Dict

from peft.tuners.tuners_utils import BaseTuner

from ..targets import PRESETS, resolve_targets
from .layer import SVDTunerLayer


class SVDPeftModel(BaseTuner):
    """Common tuner; one subclass per method fixes ``prefix`` and ``tuner_layer_cls``. ``target_modules`` takes
    PEFT's semantics and this library's presets (``"all-linear"``, ``"text-encoder"`` ...); with none, "all" (every
    Linear / Conv but the output head)."""

    prefix: str = ""
    tuner_layer_cls = SVDTunerLayer
    target_module_mapping: Dict[str, list] = {}

    @staticmethod
    def _prepare_adapter_config(peft_config, model_config):
        return peft_config

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        targets = peft_config.target_modules
        if targets is None or (isinstance(targets, str) and targets in PRESETS):
            cache = self.__dict__.setdefault("_svd_preset_matches", {})
            spec = "all" if targets is None else targets
            if spec not in cache:
                cache[spec] = {name for name, _ in resolve_targets(self.model, spec, peft_config.exclude_modules)}
            return key in cache[spec]
        return super()._check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key=None,
                            **optional_kwargs):
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, current_key)
            return
        new = self.tuner_layer_cls(target, adapter_name, peft_config, current_key)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an added, inactive adapter does not train
        self._replace_module(parent, target_name, new, target)


def tuner_classes(method: str):
    """(layer class, model class) of ``method`` with its prefix ``<method>_``."""
    prefix = f"{method}_"
    title = {"svdiff": "SVDiff", "svfit": "SVFit", "svft": "SVFT", "vectorfit": "VectorFit"}[method]
    layer = type(f"{title}Layer", (SVDTunerLayer,), {"prefix": prefix, "adapter_layer_names": (f"{prefix}adapters",),
                                                     "__module__": __name__})
    model = type(f"{title}Model", (SVDPeftModel,), {"prefix": prefix, "tuner_layer_cls": layer,
                                                    "__module__": __name__})
    return layer, model
