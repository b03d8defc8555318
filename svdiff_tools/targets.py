"""Which modules an adapter targets: PEFT's `target_modules` semantics plus presets.

A list matches a module whose name equals an entry or ends with "." + entry; a string is a full
regex match (`re.fullmatch`) unless it names a preset.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Iterator, List, Tuple, Union

from torch import nn

from .errors import SVDTargetError
from .layer import AdapterLayerMixin, SVDLayer
from .module_kinds import EmbeddingKind, is_norm, kind_of

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
PRESETS = {
    # diffusers attention projections (UNets, SD3/Flux transformers share these names)
    "unet-attention": UNET_ATTENTION,
    # attention + resnets + the transformer blocks' projections and feed-forwards
    "unet": UNET_ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in", "proj_out",
                              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                              "conv1", "conv2", "conv_shortcut", "time_emb_proj"],
    # the same for the transformer denoisers of SD3 and Flux
    "transformer": None,
    # CLIP / T5-style text encoders
    "text-encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "q", "k", "v", "o", "wi", "wi_0",
                     "wi_1", "wo"],
    # every Linear (and GPT-2 Conv1D) except the output head, as PEFT's "all-linear"
    "all-linear": None,
    # every supported Linear/Conv layer except the output head and embeddings (the default)
    "all": None,
}
OUTPUT_HEADS = ("lm_head", "classifier", "score", "head", "cls")


def _matches(name: str, spec: Union[str, List[str]]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _is_wrapper(module: nn.Module) -> bool:
    """Our adapter layers and PEFT tuner layers (a LoRA from ``load_lora_weights``) hide their insides."""
    if isinstance(module, AdapterLayerMixin):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover
        return False
    return isinstance(module, BaseTunerLayer)


def outer_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``named_modules()`` without the insides of adapter wrappers (their base layers, LoRA matrices)."""
    hidden: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") for h in hidden):
            continue
        if _is_wrapper(module):
            hidden.append(name)
        yield name, module


def adaptable_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every supported module, seeing wrappers as the module they wrap."""
    return [(n, m) for n, m in outer_modules(model) if isinstance(m, SVDLayer) or kind_of(m) is not None]


def _output_head_names(model: nn.Module) -> set:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:
            head = None
        for name, module in model.named_modules():
            if head is not None and module is head:
                heads.add(name)
    return heads


def base_of(module: nn.Module) -> nn.Module:
    """The module an adapter layer wraps, or the module itself."""
    return module.base_module if isinstance(module, AdapterLayerMixin) else module


def _nearest(spec: Union[str, List[str]], names: Iterable[str]) -> str:
    names = list(names)
    pool = set(names) | {n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names}
    wanted = [spec] if isinstance(spec, str) else list(spec)
    near = []
    for w in wanted:
        near += [n for n in difflib.get_close_matches(w, sorted(pool), n=5, cutoff=0.4) if n not in near]
    return ", ".join(near[:8]) if near else ", ".join(sorted(pool)[:8])


def resolve_targets(model: nn.Module, target_modules, exclude_modules=None) -> List[Tuple[str, nn.Module]]:
    """The (name, module) pairs an adapter with these settings adapts, or a clear `SVDTargetError`."""
    candidates = adaptable_modules(model)
    if target_modules is None:
        target_modules = "all"
    if target_modules == "transformer":
        target_modules = "unet"
    preset = target_modules if isinstance(target_modules, str) and target_modules in PRESETS else None
    if preset in ("all", "all-linear"):
        heads = _output_head_names(model) | {n for n, _ in candidates if n.split(".")[-1] in OUTPUT_HEADS}
        chosen = []
        for name, module in candidates:
            kind = kind_of(base_of(module))
            if name in heads or isinstance(kind, EmbeddingKind):
                continue
            if preset == "all-linear" and kind.name not in ("linear", "hf_conv1d"):
                continue
            chosen.append((name, module))
    else:
        spec = PRESETS[preset] if preset else target_modules
        if not isinstance(spec, (str, list, tuple, set)):
            raise SVDTargetError(f"target_modules={target_modules!r} must be a list of names, a regex or a preset "
                                 f"({', '.join(PRESETS)}).")
        spec = spec if isinstance(spec, str) else list(spec)
        chosen = [(n, m) for n, m in candidates if _matches(n, spec)]
        if not chosen:
            raise SVDTargetError(
                f"target_modules={target_modules!r} matched no Linear/Conv/Embedding module; nearest names: "
                f"{_nearest(spec, [n for n, _ in candidates])}."
            )
    if exclude_modules:
        excl = exclude_modules if isinstance(exclude_modules, str) else list(exclude_modules)
        chosen = [(n, m) for n, m in chosen if not _matches(n, excl)]
    if not chosen:
        raise SVDTargetError(f"target_modules={target_modules!r} left no module to adapt after exclude_modules.")
    return chosen


def norm_modules(model: nn.Module, exclude_modules=None) -> List[Tuple[str, nn.Module]]:
    """Every LayerNorm/GroupNorm with an affine weight (SVDiff's 1-D deltas), seeing wrappers through."""
    out = []
    for name, module in outer_modules(model):
        if is_norm(base_of(module)):
            if exclude_modules and _matches(name, exclude_modules if isinstance(exclude_modules, str)
                                            else list(exclude_modules)):
                continue
            out.append((name, module))
    return out
