"""PEFT configs of the four spectral methods: the fields of `SVDAdapterConfig` as a `PeftConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..config import SVDAdapterConfig


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
    svft_pattern: str = field(default="banded")
    svft_offset: int = field(default=2)
    svft_seed: int = field(default=0)
    avf_k: int = field(default=0)
    avf_interval: int = field(default=50)
    avf_metric: str = field(default="mean_abs")
    train_bias: Optional[bool] = field(default=None)
    svd_driver: str = field(default="auto")
    svd_dtype: str = field(default="float32")
    forward_mode: str = field(default="auto")
    basis_storage: str = field(default="auto")
    base_fingerprints: dict = field(default_factory=dict)
    method = ""  # set by the subclasses (not a field: PEFT's config JSON carries peft_type)

    def __post_init__(self):
        super().__post_init__()
        self.core()  # the core validates every field, with its one-sentence errors

    def core(self) -> SVDAdapterConfig:
        """The equivalent `SVDAdapterConfig`."""
        targets = sorted(self.target_modules) if isinstance(self.target_modules, set) else self.target_modules
        excludes = sorted(self.exclude_modules) if isinstance(self.exclude_modules, set) else self.exclude_modules
        return SVDAdapterConfig(method=self.method, rank=self.rank, target_modules=targets, exclude_modules=excludes,
                                scale=self.scale, svft_pattern=self.svft_pattern, svft_offset=self.svft_offset,
                                svft_seed=self.svft_seed, avf_k=self.avf_k, avf_interval=self.avf_interval,
                                avf_metric=self.avf_metric, train_bias=self.train_bias, svd_driver=self.svd_driver,
                                svd_dtype=self.svd_dtype, forward_mode=self.forward_mode,
                                basis_storage=self.basis_storage)


@dataclass
class SVDiffConfig(SVDPeftConfig):
    """PEFT config of SVDiff: a shift of every singular value (``rank`` stays None)."""

    method = "svdiff"

    def __post_init__(self):
        self.peft_type = PeftType.SVDIFF
        super().__post_init__()


@dataclass
class SVFitConfig(SVDPeftConfig):
    """PEFT config of SVFit: the top ``rank`` singular values (an int, or an energy fraction in (0, 1))."""

    method = "svfit"

    def __post_init__(self):
        self.peft_type = PeftType.SVFIT
        super().__post_init__()


@dataclass
class SVFTConfig(SVDPeftConfig):
    """PEFT config of SVFT: a sparse ``svft_pattern`` of M over every (or the top ``rank``) components."""

    method = "svft"

    def __post_init__(self):
        self.peft_type = PeftType.SVFT
        super().__post_init__()


@dataclass
class VectorFitConfig(SVDPeftConfig):
    """PEFT config of VectorFit: singular-value and bias deltas (Adaptive Vector Freezing: `AVFCallback`)."""

    method = "vectorfit"

    def __post_init__(self):
        self.peft_type = PeftType.VECTORFIT
        super().__post_init__()


CONFIGS = {c.method: c for c in (SVDiffConfig, SVFitConfig, SVFTConfig, VectorFitConfig)}
