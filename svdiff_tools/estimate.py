"""Plan an adapter before loading any weight: trainable parameters, adapter file bytes, stored basis bytes and the
decomposition's cost, per layer and in total, from the model's architecture alone (meta device, no SVD).

    import svdiff_tools as st
    print(st.estimate("path/to/config.json", st.SVDAdapterConfig(method="svft", target_modules="all-linear")))
    python -m svdiff_tools.estimate --config path/or/config.json --method svft --target_modules all-linear

Assumptions, stated in every report: weights of full numerical rank (true for trained weights; a zero or
rank-deficient weight trains fewer components), a float (energy) rank counted at its upper bound ``min(out, in)``,
one-sided bases without the ill-conditioned tail (lower bounds, see `basis.SVDBasis`). Decomposition cost in
GFLOP of the route the config picks (Gram: ``m n^2 + n^3`` for m >= n, in float64; randomised top-r:
``(4 * niter + 2) m n (r + oversample)``), with a time class from this project's CPU (measured: the Gram route
ran at ~8 GFLOP/s float64 on its 2 cores, a 1280 x 11520 conv weight in 0.69 s).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

from torch import nn

from . import decomposition as dec
from .basis import SVDBasis
from .config import SVDAdapterConfig
from .errors import SVDAdapterError
from .methods import add_option_flags, option_values
from .model import check_rank_fits
from .module_kinds import kind_of
from .targets import norm_modules, resolve_targets

CPU_GFLOPS = 8.0  # this project's 2-core CPU on the float64 Gram route
# An adapter file's bytes besides its values (`io.write_adapter_file`), fitted to files written by the tests' models:
# each module's metadata record (kind, shapes, rank, driver, fingerprint: JSON inside the JSON header) besides its
# name, and each tensor's header entry and checksum besides its key, which both repeat.
RECORD_BYTES, NORM_RECORD_BYTES, TENSOR_BYTES, FILE_BYTES = 450, 215, 112, 700


def file_overhead(name: str, tensors: Sequence[str], record: int = RECORD_BYTES) -> int:
    """Metadata bytes of one module ``name`` whose state holds ``tensors`` (suffixes such as ``delta``)."""
    return len(name) + record + sum(2 * (len(name) + 1 + len(t)) + TENSOR_BYTES for t in tensors)


@dataclass
class LayerEstimate:
    name: str
    kind: str
    shape: tuple
    rank: int
    trainable: int
    file_bytes: int
    basis_bytes: int
    driver: str
    gflop: float


@dataclass
class Estimate:
    method: str
    layers: List[LayerEstimate] = field(default_factory=list)
    norm_trainable: int = 0
    norm_file_bytes: int = 0
    model_parameters: int = 0

    @property
    def trainable(self) -> int:
        return sum(layer.trainable for layer in self.layers) + self.norm_trainable

    @property
    def file_bytes(self) -> int:
        return sum(layer.file_bytes for layer in self.layers) + self.norm_file_bytes + FILE_BYTES

    @property
    def basis_bytes(self) -> int:
        return sum(layer.basis_bytes for layer in self.layers)

    @property
    def gflop(self) -> float:
        return sum(layer.gflop for layer in self.layers)

    def summary(self) -> str:
        seconds = self.gflop / CPU_GFLOPS
        when = f"~{seconds:.0f} s" if seconds < 120 else f"~{seconds / 60:.0f} min"
        return (f"{self.method}: {len(self.layers)} layers, {self.trainable:,} trainable parameters "
                f"({100 * self.trainable / max(self.model_parameters, 1):.4f}% of {self.model_parameters:,}), "
                f"adapter file ~{self.file_bytes / 2**20:.2f} MiB, stored bases {self.basis_bytes / 2**20:.1f} MiB, "
                f"decomposition {self.gflop:.1f} GFLOP ({when} on a 2-core CPU, once: cached on disk)")

    def __str__(self) -> str:
        lines = [f"{'layer':<58} {'matrix':>13} {'rank':>5} {'trainable':>10} {'basis MiB':>10} {'route':>10}"]
        lines += [f"{l.name:<58} {f'{l.shape[0]}x{l.shape[1]}':>13} {l.rank:>5} {l.trainable:>10,} "
                  f"{l.basis_bytes / 2**20:>10.2f} {l.driver:>10}" for l in self.layers]
        lines.append(self.summary())
        lines.append("assumes full-rank weights, energy ranks at their upper bound, one-sided bases without tail")
        return "\n".join(lines)


def build_model(source) -> nn.Module:
    """A weightless model: ``source`` is an nn.Module, a transformers/diffusers config (object or dict), or a
    path to a ``config.json`` (or a folder with one)."""
    from accelerate import init_empty_weights

    if isinstance(source, nn.Module):
        return source
    if isinstance(source, (str, Path)):
        source = load_config_source(source)
    if isinstance(source, dict) and "_class_name" in source:
        # a diffusers model config names its class; the core imports the library the file names (as diffusers'
        # own model_index.json loading does), so it never depends on diffusers itself
        library = importlib.import_module("diffusers")
        cls = getattr(library, source["_class_name"])
        with init_empty_weights():
            return cls.from_config(source)
    from transformers import AutoConfig, AutoModel

    config = source if not isinstance(source, dict) else AutoConfig.for_model(**source)
    with init_empty_weights():
        return AutoModel.from_config(config)


def estimate(model_or_config, config: SVDAdapterConfig, weight_bytes: int = 4) -> Estimate:
    """The plan for ``config`` on a model (see the module docstring); ``weight_bytes``: the basis element size
    (4 for float32 models, 2 for half-precision ones)."""
    model = build_model(model_or_config)
    cls = config.method_class
    out = Estimate(config.method, model_parameters=sum(p.numel() for p in model.parameters()))
    for name, module in resolve_targets(model, config.target_modules, config.exclude_modules):
        kind = kind_of(module)
        shape = tuple(kind.matrix_shape)
        k = min(shape)
        requested = cls.requested_rank(config)
        check_rank_fits(requested, shape, name)  # as injection refuses it
        rank = k if requested is None or isinstance(requested, float) else int(requested)
        bias = kind.out_features if kind.has_channels_last_bias else None
        trainable = cls.trainable_count(rank, bias, config)
        driver = dec.resolve_driver(config.svd_driver, rank if isinstance(requested, int) else None, k)
        big, small = max(shape), min(shape)
        if driver == "randomized":
            gflop = (4 * dec.RANDOMIZED_NITER + 2) * big * small * (rank + dec.RANDOMIZED_OVERSAMPLE) * 2 / 1e9
            q = rank
        else:
            gflop = 2 * (big * small * small + small ** 3) / 1e9
            q = k
        one_sided = (SVDBasis.worth_one_sided(config.basis_storage, shape, kind.supports_input_correction())
                     and driver != "randomized" and requested is None)
        basis = (q * q + q) if one_sided else ((shape[0] + shape[1]) * q + q)
        # SVFT stores each entry of M with its (row, col) indices, int64 each, whatever the pattern
        sparse = getattr(cls, "name", "") == "svft"
        entries = cls.trainable_count(rank, None, config.replace(train_bias=False))  # M alone, no bias
        index_bytes = 16 * entries if sparse else 0
        tensors = ["rows", "cols", "values"] if sparse else ["delta"]
        tensors += ["bias_delta"] if trainable > entries else []
        out.layers.append(LayerEstimate(name, kind.name, shape, rank, trainable,
                                        4 * trainable + index_bytes + file_overhead(name, tensors),
                                        basis * weight_bytes, driver, gflop))
    if config.train_norms:
        norms = list(norm_modules(model, config.exclude_modules))
        out.norm_trainable = sum(m.weight.numel() for _, m in norms)
        out.norm_file_bytes = sum(4 * m.weight.numel() + file_overhead(n, ["weight_delta"], NORM_RECORD_BYTES)
                                  for n, m in norms)
    return out


def load_config_source(path) -> dict:
    """The JSON of a ``config.json`` (or a folder with one), or an `SVDAdapterError` in one sentence."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SVDAdapterError(f"--config {path} does not exist; pass a model's config.json or its folder.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SVDAdapterError(f"--config {path} is not readable JSON ({type(exc).__name__}); pass a model's "
                              "config.json.") from None
    if not isinstance(data, dict):
        raise SVDAdapterError(f"--config {path} holds no JSON object; pass a model's config.json.")
    return data


def model_from_config_file(path) -> nn.Module:
    """`build_model` of a config file, with a one-sentence error for a config no library knows."""
    data = load_config_source(path)
    try:
        return build_model(data)
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        what = data.get("_class_name") or data.get("model_type")
        raise SVDAdapterError(f"--config {path} describes a model ({what!r}) that neither transformers nor diffusers "
                              f"can build ({type(exc).__name__}); pass the config.json of a transformers or diffusers "
                              "model.") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a config.json (transformers or diffusers) or a folder with one")
    p.add_argument("--method", default="svdiff")
    p.add_argument("--rank", type=float, default=None)
    p.add_argument("--target_modules", default=None)
    add_option_flags(p)  # every method's own options (--svft_pattern, --avf_k, ...), as declared
    p.add_argument("--basis_storage", default="auto")
    p.add_argument("--train_norms", action="store_true")
    p.add_argument("--half", action="store_true", help="a half-precision model (bases in 2 bytes)")
    args = p.parse_args(argv)
    targets = args.target_modules
    if targets and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    rank: Optional[Union[int, float]] = args.rank
    if rank is not None and float(rank).is_integer() and rank >= 1:
        rank = int(rank)
    try:
        config = SVDAdapterConfig(method=args.method, rank=rank, target_modules=targets,
                                  basis_storage=args.basis_storage, train_norms=args.train_norms,
                                  **option_values(args))
        print(estimate(model_from_config_file(args.config), config, weight_bytes=2 if args.half else 4))
    except SVDAdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
