"""The PEFT tuner models: `BaseTuner`s that replace targeted modules with `SVDTunerLayer`s.

Besides PEFT's hooks for targets and layers, the tuner seals what it saves and checks what it loads
(`checks.record_checksums` / `checks.verify_state`, through PEFT's state-dict hooks), and an injection or a load that
fails takes its adapter out again (`checks.rollback`), so the model is left as it was.
"""

from __future__ import annotations

from typing import Dict

from peft.tuners.tuners_utils import BaseTuner

from ..targets import PRESETS, resolve_targets
from .checks import record_checksums, rollback, verify_state
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

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        try:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        except BaseException:
            rollback(model, adapter_name)
            raise

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        record_checksums(config, {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in selected.items()})
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        try:
            verify_state(model, config, adapter_name, state_dict)
        except BaseException:
            rollback(model, adapter_name)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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


def tuner_classes(method_cls: type):
    """(layer class, model class) of a registered method, with its prefix ``<method>_``."""
    prefix = f"{method_cls.name}_"
    title = method_cls.__name__
    layer = type(f"{title}Layer", (SVDTunerLayer,), {"prefix": prefix, "adapter_layer_names": (f"{prefix}adapters",),
                                                     "__module__": __name__})
    model = type(f"{title}Model", (SVDPeftModel,), {"prefix": prefix, "tuner_layer_cls": layer,
                                                    "__module__": __name__})
    return layer, model
