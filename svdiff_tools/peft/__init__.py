"""PEFT-native SVD methods: ``import svdiff_tools.peft`` registers every method of `svdiff_tools.methods.REGISTRY`
(``svdiff``, ``svfit``, ``svft``, ``vectorfit``, and any registered later) with PEFT (opt-in; idempotent), so that

    from peft import get_peft_model, PeftModel
    from svdiff_tools.peft import SVFTConfig
    model = get_peft_model(model, SVFTConfig(target_modules=["query", "value"], svft_pattern="banded"))
    model.print_trainable_parameters(); model.save_pretrained("out")
    PeftModel.from_pretrained(base, "out"); model.merge_and_unload(); model.set_adapter(...)

work, and the transformers `Trainer` trains, checkpoints and resumes such models (VectorFit's Adaptive Vector
Freezing as `AVFCallback`). Each tuner layer is a thin `BaseTunerLayer` over the core `SVDLayer`.

Registration: PEFT accepts only names in its `PeftType` enum, so the enum is extended with the ``aenum`` package
(`extend_enum`). The members' *values*, which `save_pretrained` writes into ``adapter_config.json``, carry a
sentence (``"SVDIFF (svdiff-tools adapter: import svdiff_tools.peft before loading it)"``): a process that loads
such a folder without this import gets PEFT's ``KeyError`` with that sentence instead of a bare name. That is
also why the mappings are filled here as `peft.utils.register_peft_method` fills them (its first check compares
the name with the values). Diffusers pipelines should keep this library's own layers (`pipe.load_svd_adapter`):
diffusers' LoRA verbs act on every PEFT tuner layer.
"""

from __future__ import annotations

from ..methods import ON_REGISTER, REGISTRY
from . import config as _config
from .callbacks import AVFCallback  # noqa: F401
from .config import CONFIGS, SVDPeftConfig, config_class  # noqa: F401
from .model import SVDPeftModel, tuner_classes  # noqa: F401

HINT = "svdiff-tools adapter: import svdiff_tools.peft before loading it"
LAYERS, MODELS = {}, {}


def peft_type_value(method: str) -> str:
    return f"{method.upper()} ({HINT})"


def register() -> None:
    """Extend `PeftType` and fill PEFT's mappings for every registered method (idempotent); a method registered
    later is registered as it comes (`methods.ON_REGISTER`)."""
    from peft.tuners.tuners_utils import BaseTuner

    if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):  # the hook that checks every loaded file
        import peft

        raise ImportError(f"svdiff_tools.peft needs peft >= 0.21 (this is {peft.__version__}), whose loading hooks "
                          "check adapter files: pip install -U peft.")
    for method_cls in REGISTRY.values():
        _follow(method_cls, True)
    if _follow not in ON_REGISTER:
        ON_REGISTER.append(_follow)


def _follow(method_cls: type, registered: bool) -> None:
    """Register one method with PEFT (its `PeftType` member, config class, tuner and prefix), or take it out."""
    from aenum import extend_enum
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    method, name = method_cls.name, method_cls.name.upper()
    if not registered:
        if name in PeftType.__members__:  # the enum member stays (aenum cannot remove it); a re-registration reuses it
            for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
                mapping.pop(PeftType[name], None)
        for table in (CONFIGS, LAYERS, MODELS):
            table.pop(method, None)
        return
    if name not in PeftType.__members__:
        extend_enum(PeftType, name, peft_type_value(method))
    member = PeftType[name]
    if member.value != peft_type_value(method):
        raise RuntimeError(f"PEFT already defines a method {name} of its own; this svdiff-tools release cannot "
                           f"register its {method} there: use svdiff_tools.inject_adapter instead.")
    if method not in CONFIGS:
        CONFIGS[method] = config_class(method_cls)
        setattr(_config, CONFIGS[method].__name__, CONFIGS[method])  # importable by name, and picklable
    if method not in MODELS:
        LAYERS[method], MODELS[method] = tuner_classes(method_cls)
    PEFT_TYPE_TO_CONFIG_MAPPING[member] = CONFIGS[method]
    PEFT_TYPE_TO_TUNER_MAPPING[member] = MODELS[method]
    PEFT_TYPE_TO_PREFIX_MAPPING[member] = MODELS[method].prefix


register()
SVDiffConfig, SVFitConfig, SVFTConfig, VectorFitConfig = (CONFIGS[m] for m in ("svdiff", "svfit", "svft", "vectorfit"))
METHODS = tuple(CONFIGS)  # the methods registered with PEFT at import (`CONFIGS` follows later ones)


def save_as_svd_adapter(peft_model, path, adapter_name: str = "default"):
    """Write a PEFT-route adapter as a `save_adapter` file (the same tensors, config and base fingerprints), which
    `svdiff_tools.load_adapter` loads into the plain base model and `pipe.load_svd_adapter` into a pipeline: the
    two routes describe one adapter, and this is the conversion between their files."""
    from ..io import layers_state, write_adapter_file
    from .layer import SVDTunerLayer

    config = peft_model.peft_config[adapter_name]
    if config.modules_to_save:
        raise ValueError(f"this adapter also trains {sorted(config.modules_to_save)} in full (modules_to_save), which "
                         "an svdiff-tools adapter file cannot hold: keep PEFT's save_pretrained folder for it.")
    prefix = "base_model.model."
    layers = [(name[len(prefix):] if name.startswith(prefix) else name, module.core)
              for name, module in peft_model.named_modules() if isinstance(module, SVDTunerLayer)]
    return write_adapter_file(path, {"": layers_state(layers, config.core(), adapter_name)}, adapter_name)
