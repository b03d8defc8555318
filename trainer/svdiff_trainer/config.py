"""The run's configuration, typed: `RunConfig`, one section per concern.

Every flag of ``train_dreambooth.py`` is one field of one section (`SECTIONS`); a method's own options
(``--svft_pattern``, ``--avf_k``, ...: `svdiff_tools.methods.Option`) live in ``method.options``. The command line
(`args.parse_args`) makes one from the parsed flags, fills the defaults and validates it; below it, functions take
the config or the section they need, never an ``argparse.Namespace``. ``flat()`` is the run's record (``run.json``):
every flag by name, as it was before the sections.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from svdiff_tools.methods import all_options


@dataclass
class ModelConfig:
    """The base model: a hub id or folder, or (``embedded_kind``) an embedded preset (`presets.Preset`)."""

    pretrained_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    pretrained_vae_model_name_or_path: Optional[str] = None
    embedded_model: bool = False
    embedded_kind: Optional[str] = None


@dataclass
class DataConfig:
    """The subject's images and prompts, prior preservation, captions, Cut-Mix-Unmix, image size."""

    instance_data_dir: Optional[str] = None
    instance_prompt: Optional[str] = None
    identifier: Optional[str] = None
    class_word: Optional[str] = None
    subject: Optional[List[str]] = None
    subjects: list = field(default_factory=list)  # args.SubjectSpec, parsed from ``subject``
    cutmix_unmix: bool = False
    cutmix_probability: float = 0.5
    unmix_weight: float = 0.1
    caption_extension: str = ".txt"
    caption_probability: Optional[float] = None
    class_data_dir: Optional[str] = None
    class_prompt: Optional[str] = None
    with_prior_preservation: Optional[bool] = None
    prior_loss_weight: Optional[float] = None
    num_class_images: Optional[int] = None
    sample_batch_size: int = 4
    prior_generation_precision: Optional[str] = None
    resolution: Optional[int] = None
    center_crop: bool = True
    random_flip: bool = False
    dataloader_num_workers: int = 0


@dataclass
class MethodConfig:
    """What is adapted and how: the method, its rank and targets, its own options, the text encoder, exports."""

    method: str = "svfit"
    rank: Optional[Union[int, float]] = None
    target_modules: Optional[Union[str, list]] = None
    options: Dict[str, Any] = field(default_factory=lambda: {n: o.default for n, o in all_options().items()})
    train_norms: bool = False
    basis_storage: str = "auto"
    learning_rate_1d: float = 1e-6
    export_lora_rank: Optional[Union[int, float]] = None
    train_text_encoder: Optional[bool] = None


@dataclass
class OptimConfig:
    """Optimisation: steps, batch, learning rates and schedule, Adam, precision, seed."""

    learning_rate: Optional[float] = None
    text_encoder_lr: Optional[float] = None
    scale_lr: bool = False
    lr_scheduler: Optional[str] = None
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    train_batch_size: int = 1
    max_train_steps: Optional[int] = None
    num_train_epochs: Optional[int] = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    mixed_precision: Optional[str] = None
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    cache_latents: bool = False
    seed: Optional[int] = None


@dataclass
class ValidationConfig:
    """Validation images: prompts, count, seeds, sampling steps and guidance (class images sample the same way)."""

    validation_prompt: Optional[str] = None
    validation_prompts: Optional[List[str]] = None
    num_validation_images: Optional[int] = None
    guidance_scale: Optional[float] = None
    validation_seed: Optional[int] = None
    num_inference_steps: Optional[int] = None
    validation_steps: Optional[int] = None
    dino_model: Optional[str] = None
    clip_model: Optional[str] = None


@dataclass
class OutputConfig:
    """Where results go: the output folder, checkpoints, logging, the Hub."""

    output_dir: str = "svd-dreambooth-model"
    overwrite_output_dir: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    report_to: str = "none"
    logging_dir: str = "logs"
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = None


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "method": MethodConfig, "optim": OptimConfig,
                 "validation": ValidationConfig, "output": OutputConfig}
SECTIONS = {f.name: section for section, cls in SECTION_TYPES.items() for f in fields(cls) if f.name != "options"}


@dataclass
class RunConfig:
    """One run, in sections (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    chosen: Dict[str, str] = field(default_factory=dict)  # flag -> where the default it got came from (not recorded)

    @classmethod
    def from_flags(cls, flags: Dict[str, Any]) -> "RunConfig":
        """A config from flag values by name (the parsed command line, or a part of it: the rest keep their
        defaults); a name that is no flag is an error."""
        config = cls()
        for name, value in flags.items():
            config.set(name, value)
        return config

    def _where(self, name: str):
        if name in SECTIONS:
            return getattr(self, SECTIONS[name]), name
        if name in all_options():
            return self.method.options, name
        raise KeyError(f"{name!r} is no flag of train_dreambooth.py")

    def get(self, name: str) -> Any:
        """A flag's value by its name (the command line's view: defaults and checks by flag)."""
        holder, key = self._where(name)
        return holder[key] if isinstance(holder, dict) else getattr(holder, key)

    def set(self, name: str, value: Any) -> None:
        holder, key = self._where(name)
        if isinstance(holder, dict):
            holder[key] = value
        else:
            setattr(holder, key, value)

    def flat(self) -> Dict[str, Any]:
        """Every flag by name (method options included): the run's record."""
        out = {name: getattr(getattr(self, section), name) for name, section in SECTIONS.items()}
        out.update(self.method.options)
        return copy.deepcopy(out)
