"""The ways an `SVDLayer` computes its output with live adapters, and the one place that picks one.

For the live adapters ``a`` (`LiveAdapter`: method, basis views, scale, forward mode) the layer computes
``y = op(x; W + sum_a s_a U_a M_a V_a^T, b + sum_a s_a bias_delta_a)`` on one of three paths:

    FACTORED     y = base(x) + sum_a s_a (x V_a)(U_a M_a)^T    ~ tokens * (out + in) * r flops
    RECOMPOSED   W' = addmm(W, U_a M_a, V_a^T), then op(x; W')  ~ out * in * r flops, any token count
    STACKED      a PEFT LoRA layer underneath: y = lora_layer(x) + op(x; sum_a s_a U_a M_a V_a^T)

`choose` is the chooser: the factored path where a forward mode forces it, or where the kind and every basis
allow it and `path_cost` finds it cheaper (remembered per input shape and grad mode in the layer's ``_paths``);
else stacked over a LoRA layer, else recomposed. ``W`` itself is never rebuilt from the factors, so an adapter
with ``M = 0`` gives the base output bit for bit on every path. (No live adapter at all is the layer's own
pass-through, `layer.AdapterLayerMixin`.)
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import path_cost
from .basis import Parts, SVDBasis
from .methods import SpectralMethod


def summed_bias(terms, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """``sum scale * bias_delta`` over ``(method, scale)`` terms, in ``dtype`` if given (None when no method
    trains a bias)."""
    total = None
    for method, scale in terms:
        b = method.bias()
        if b is not None:
            if dtype is not None:
                b = b.to(dtype)
            term = b if scale == 1.0 else b * scale
            total = term if total is None else total + term
    return total


class LiveAdapter(NamedTuple):
    """What one adapter needs per call, computed once per state change: its method, its basis and the views
    of it that the adapter reads (`basis.Parts`), its own scale and forward mode."""
    method: SpectralMethod
    basis: SVDBasis
    parts: Parts
    scale: float
    mode: str

    def factored(self, kind, x: torch.Tensor, y_nb: Optional[torch.Tensor]):
        return self.basis.factored(self.parts, self.method, kind, x, y_nb)

    def add_to(self, Wm: torch.Tensor, W0: torch.Tensor, alpha: float, transposed: bool = False) -> torch.Tensor:
        return self.basis.add_to(self.parts, self.method, Wm, W0, alpha, transposed)


def bias_delta(layer, live: Tuple[LiveAdapter, ...], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``sum_a s_a * bias_delta_a`` of the live adapters at this call's scale, in ``dtype``."""
    return summed_bias(((e.method, e.scale * layer.call_scale) for e in live), dtype)


class Factored:
    """``y = base(x) + sum_a s_a * project_out(project_in(x, V_a), U_a M_a)`` (see `LiveAdapter.factored`:
    one-sided entries read ``x V_h`` from the base output without bias, and diagonal methods with few tokens
    scale ``z`` instead of building ``U_a M_a``)."""

    def __call__(self, layer, x, live, args, kwargs):
        kind, call = layer.kind, layer.call_scale
        if any(e.basis.reads_base_output for e in live):  # one-sided left entries read the base output w/o bias
            y = y_nb = layer.base_module(x, *args, **kwargs)  # the base op as it is (bias fused): exact at M = 0
            base_bias = getattr(kind.module, "bias", None)
            if base_bias is not None:
                y_nb = kind.add_bias(y, -base_bias)
            terms = [(e.factored(kind, x, y_nb)[1], e.scale * call) for e in live]
        else:  # one-sided right entries add their head's term to the base op's input (left and right never mix:
            x_in, terms = x, []  # the orientation follows the layer's shape)
            for e in live:
                dx, dy = e.factored(kind, x, None)
                if dx is not None:
                    x_in = torch.add(x_in, dx, alpha=e.scale * call)
                if dy is not None:
                    terms.append((dy, e.scale * call))
            y = layer.base_module(x_in, *args, **kwargs)
        for dy, alpha in terms:
            y = torch.add(y, dy, alpha=alpha)
        bias = bias_delta(layer, live, y.dtype)
        return y if bias is None else kind.add_bias(y, bias)


class Recomposed:
    """``W' = addmm(W, U_a M_a, V_a^T, alpha=s_a)`` for each adapter, then the base op with ``W'``.

    Training keeps ``W'`` alive until backward (the base op needs it for the input gradient), one weight-
    sized tensor per layer. For large weights and low ranks (`rebuild_in_backward`) a saved-tensor hook
    stores a recipe instead and rebuilds ``W'`` in backward (one more ``addmm``), like activation
    checkpointing but for the weight."""

    RECOMPUTE_MIN_NUMEL = 1 << 18  # rebuild W' in backward instead of keeping it, from 256Ki elements (1 MiB fp32)

    def __call__(self, layer, x, live, args, kwargs):
        matrix = self.matrix(layer, live, layer.call_scale)
        kind = layer.kind
        weight = kind.weight_from_matrix(matrix)
        bias = getattr(kind.module, "bias", None)
        delta = bias_delta(layer, live, weight.dtype)
        if delta is not None:
            bias = delta if bias is None else bias + delta
        if weight.requires_grad and torch.is_grad_enabled() and self.rebuild_in_backward(layer, weight, live):
            with torch.autograd.graph.saved_tensors_hooks(*self._recipe_hooks(layer, matrix, live)):
                return kind.forward(x, weight, bias)
        return kind.forward(x, weight, bias)

    def rebuild_in_backward(self, layer, weight: torch.Tensor, live) -> bool:
        """Keep a recipe instead of ``W'`` when the weight is large or the rebuild is cheap (low rank: one
        ``out x in x r`` product with ``4 r <= min(out, in)``); never inside torch.compile."""
        if torch.compiler.is_compiling():  # AOTAutograd picks what to save and recompute itself
            return False
        r = sum(e.method.rank for e in live)
        return weight.numel() >= self.RECOMPUTE_MIN_NUMEL or 4 * r <= min(layer.kind.matrix_shape)

    def matrix(self, layer, live, call: float) -> torch.Tensor:
        """``W + sum_a s_a * U_a M_a V_a^T`` as a fresh (out x in) matrix (``live`` is never empty here)."""
        W0 = Wm = layer.kind.matrix(layer.kind.module.weight)
        for e in live:
            Wm = e.add_to(Wm, W0, e.scale * call, layer.kind.stores_transposed)
        return Wm

    def _recipe_hooks(self, layer, matrix: torch.Tensor, live):
        """(pack, unpack) for `torch.autograd.graph.saved_tensors_hooks`: a saved tensor that lives in
        ``matrix``'s storage (the weight, or a view such as its transpose) is packed as its view geometry
        and rebuilt in backward from the adapter tensors, which do not change between forward and backward."""
        # capture plain values only: a closure holding ``matrix`` would keep W' alive, defeating the point
        storage, dtype = matrix.untyped_storage().data_ptr(), matrix.dtype
        size, stride, call = matrix.shape, matrix.stride(), layer.call_scale  # call_scale resets after the call

        def pack(t):
            if t.untyped_storage().data_ptr() != storage or t.dtype != dtype:
                return t
            return (t.shape, t.stride(), t.storage_offset())

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            with torch.no_grad():
                rebuilt = self.matrix(layer, live, call)
                if rebuilt.stride() != stride:
                    rebuilt = torch.empty_strided(size, stride, dtype=rebuilt.dtype,
                                                  device=rebuilt.device).copy_(rebuilt)
            return rebuilt.as_strided(*packed)

        return pack, unpack


class Stacked:
    """A PEFT LoRA layer underneath: ``y = lora_layer(x) + op(x; sum_a s_a U_a M_a V_a^T)`` (``op`` is linear in
    the weight, so our term adds to whatever the LoRA layer computes)."""

    def __call__(self, layer, x, live, args, kwargs):
        W = layer.kind.module.weight
        scales = layer.live_scales()
        delta = layer.delta_matrix(list(scales), scales, dtype=W.dtype)
        bias = layer.delta_bias(list(scales), scales)
        bias = None if bias is None else bias.to(W.dtype)
        return layer.base_module(x, *args, **kwargs) + layer.kind.forward(x, layer.kind.weight_from_matrix(delta),
                                                                          bias)


FACTORED, RECOMPOSED, STACKED = Factored(), Recomposed(), Stacked()
PATH_CACHE_SIZE = 64  # input shapes whose factored-or-not choice a layer remembers


def factored_wins(layer, x: torch.Tensor, live: Tuple[LiveAdapter, ...]) -> bool:
    """Factored or not for this input: forced by a forward mode, impossible for some kinds and bases, else by
    `path_cost` (remembered per input shape and grad mode in ``layer._paths``)."""
    key = (x.shape, torch.is_grad_enabled())
    choice = layer._paths.get(key)
    if choice is not None:
        return choice
    kind = layer.kind
    modes = {e.mode for e in live}
    if not kind.supports_factored() or "recompose" in modes or not all(e.basis.factored_on(kind) for e in live):
        choice = False
    elif "factored" in modes:
        choice = True
    else:
        shape = kind.matrix_shape
        training = key[1] and any(p.requires_grad for e in live for p in e.method.parameters())
        choice = path_cost.factored_is_cheaper((e.basis.flops(e.method.rank, shape) for e in live), shape,
                                               kind.tokens(x), training)
    if len(layer._paths) >= PATH_CACHE_SIZE:
        layer._paths.clear()
    layer._paths[key] = choice
    return choice


def choose(layer, x: torch.Tensor, live: Tuple[LiveAdapter, ...]):
    """The path for this call (``live`` is not empty): factored where it wins, else stacked over a LoRA layer,
    else recomposed."""
    if factored_wins(layer, x, live):
        return FACTORED
    return STACKED if layer.kind.stacked else RECOMPOSED
