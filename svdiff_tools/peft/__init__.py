"""PEFT-native SVD methods: ``import svdiff_tools.peft`` registers ``svdiff``, ``svfit``, ``svft`` and
``vectorfit`` with PEFT (opt-in; idempotent), so that

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

from .callbacks import AVFCallback  # noqa: F401
from .config import CONFIGS, SVDiffConfig, SVDPeftConfig, SVFitConfig, SVFTConfig, VectorFitConfig  # noqa: F401
from .model import SVDPeftModel, tuner_classes  # noqa: F401

METHODS = ("svdiff", "svfit", "svft", "vectorfit")
HINT = "svdiff-tools adapter: import svdiff_tools.peft before loading it"
LAYERS, MODELS = {}, {}


def peft_type_value(method: str) -> str:
    return f"{method.upper()} ({HINT})"


def register() -> None:
    """Extend `PeftType` and fill PEFT's mappings for the four methods (idempotent)."""
    from aenum import extend_enum
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import PeftType

    if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):  # the hook that checks every loaded file
        import peft

        raise ImportError(f"svdiff_tools.peft needs peft >= 0.21 (this is {peft.__version__}), whose loading hooks "
                          "check adapter files: pip install -U peft.")

    for method in METHODS:
        name = method.upper()
        if name not in PeftType.__members__:
            extend_enum(PeftType, name, peft_type_value(method))
        member = PeftType[name]
        if member.value != peft_type_value(method):
            raise RuntimeError(f"PEFT already defines a method {name} of its own; this svdiff-tools release cannot "
                               "register its {method} there: use svdiff_tools.inject_adapter instead.")
        if method not in MODELS:
            LAYERS[method], MODELS[method] = tuner_classes(method)
        PEFT_TYPE_TO_CONFIG_MAPPING[member] = CONFIGS[method]
        PEFT_TYPE_TO_TUNER_MAPPING[member] = MODELS[method]
        PEFT_TYPE_TO_PREFIX_MAPPING[member] = MODELS[method].prefix


register()


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
