"""PEFT configs of the spectral methods: the fields of `SVDAdapterConfig` as a `PeftConfig`, one class per registered
method (`config_class`: the common fields of `SVDPeftConfig` plus every method option, `methods.Option`, as declared).

A saved ``adapter_config.json`` is sealed: ``checksum`` is a blake2b of every field that changes the adapter's effect
(`SEALED_FIELDS`: this class's fields, ``peft_type`` and ``task_type``), and those fields include
``base_fingerprints`` and ``tensor_checksums`` (a digest of each tensor of the weights file, recorded when the
adapter is saved). A config read back with a checksum that does not match is refused; one read from a folder
without a checksum is refused too (`from_pretrained`). Fields PEFT rewrites on its own (``inference_mode``,
``base_model_name_or_path``, ``revision``, ``peft_version``) are not sealed: they do not change the effect.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Dict, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..config import SVDAdapterConfig
from ..errors import SVDAdapterFileError, SVDConfigError
from ..io import json_digest
from ..methods import all_options

CONFIG_NAME = "adapter_config.json"


def _plain(value):
    """``value`` as canonical JSON data: enums as their values, sets and tuples as (sorted) lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass
class SVDPeftConfig(PeftConfig):
    """Common fields (see `svdiff_tools.SVDAdapterConfig` for their meaning). ``target_modules`` takes PEFT's
    semantics (a list of name suffixes or a regex) and also this library's presets (``"all-linear"`` ...).
    ``modules_to_save`` are trained in full
    and saved beside the adapter, as in LoRA (a ``SEQ_CLS`` task adds the classifier head). ``base_fingerprints`` is filled when the adapter is created: a loaded adapter refuses another base model."""

    target_modules: Optional[Union[list, str]] = field(default=None)
    exclude_modules: Optional[Union[list, str]] = field(default=None)
    modules_to_save: Optional[list] = field(default=None)
    rank: Optional[Union[int, float]] = field(default=None)
    scale: float = field(default=1.0)
    train_bias: Optional[bool] = field(default=None)
    svd_driver: str = field(default="auto")
    svd_dtype: str = field(default="float32")
    forward_mode: str = field(default="auto")
    basis_storage: str = field(default="auto")
    init_weights: bool = field(default=True)
    base_fingerprints: dict = field(default_factory=dict)
    tensor_checksums: dict = field(default_factory=dict)
    checksum: Optional[str] = field(default=None)
    method = ""  # set by the subclasses (not a field: PEFT's config JSON carries peft_type)

    def __post_init__(self):
        self.peft_type = PeftType[self.method.upper()]
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise SVDConfigError(f"init_weights={self.init_weights!r} must be True (the adapter starts as the "
                                      "base model) or False (a small seeded random delta, for tests).")
        self.core()  # the core validates every field, with its one-sentence errors
        # A checksum came with the fields: they were read from a file, so they must be exactly what was saved.
        self._sealed = self.checksum is not None
        if self._sealed and self.checksum != self.seal():
            raise SVDAdapterFileError(f"{CONFIG_NAME} fails its checksum (a field such as scale, rank, "
                                      "target_modules or base_fingerprints was edited, or the file is damaged); "
                                      "re-save the adapter with save_pretrained or re-download it.")

    def seal(self) -> str:
        """`io.json_digest` of the sealed fields."""
        return json_digest({name: _plain(getattr(self, name)) for name in sealed_fields(type(self))})

    def to_dict(self) -> dict:
        """PEFT's dict of the fields, with ``checksum`` computed now (it is what `save_pretrained` writes)."""
        out = super().to_dict()
        out["checksum"] = self.seal()
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader, plus: the file must carry a checksum that matches, and errors name the file."""
        where = os.path.join(str(pretrained_model_name_or_path), subfolder or "", CONFIG_NAME)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except SVDAdapterFileError as exc:
            message = str(exc)
            raise SVDAdapterFileError(message.replace(CONFIG_NAME, where, 1) if message.startswith(CONFIG_NAME)
                                      else f"{where}: {message}") from None
        if not config._sealed:
            raise SVDAdapterFileError(f"{where} has no checksum (it was edited, or saved by svdiff-tools 0.1.0, "
                                      "before PEFT-route adapters were sealed); re-save the adapter with "
                                      "save_pretrained.")
        config._source = os.path.dirname(where)
        return config

    def core(self) -> SVDAdapterConfig:
        """The equivalent `SVDAdapterConfig`."""
        targets = sorted(self.target_modules) if isinstance(self.target_modules, set) else self.target_modules
        excludes = sorted(self.exclude_modules) if isinstance(self.exclude_modules, set) else self.exclude_modules
        options = {name: getattr(self, name) for name in all_options() if name in self.__dataclass_fields__}
        return SVDAdapterConfig(method=self.method, rank=self.rank, target_modules=targets, exclude_modules=excludes,
                                scale=self.scale, train_bias=self.train_bias, svd_driver=self.svd_driver,
                                svd_dtype=self.svd_dtype, forward_mode=self.forward_mode,
                                basis_storage=self.basis_storage, **options)


def config_class(method_cls: type) -> type:
    """The PEFT config class of a registered method: `SVDPeftConfig` plus every method option (`methods.Option`)
    as a field with its declared default, named ``<Method>Config`` (``SVFTConfig``)."""
    options = [(o.name, o.kind, field(default=o.default)) for o in all_options().values()]
    summary = (sys.modules[method_cls.__module__].__doc__ or method_cls.name).strip().splitlines()[0]
    return make_dataclass(f"{method_cls.__name__}Config", options, bases=(SVDPeftConfig,),
                          namespace={"method": method_cls.name, "__module__": __name__,
                                     "__doc__": f"PEFT config of {summary}"})


def sealed_fields(cls: type) -> tuple:
    """The fields a saved config's checksum covers: ``peft_type``, ``task_type``, `SVDPeftConfig`'s own fields and the
    method options (not ``checksum``, nor the fields PEFT rewrites by itself)."""
    own = set(SVDPeftConfig.__annotations__) | set(all_options())
    return ("peft_type", "task_type") + tuple(f.name for f in fields(cls) if f.name in own and f.name != "checksum")


CONFIGS: Dict[str, type] = {}  # method name -> its config class (filled by `svdiff_tools.peft.register`)
