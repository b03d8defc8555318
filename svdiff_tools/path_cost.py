"""Which forward path an adapter layer takes for an input: recompose ``W'`` or run the thin projections.

Flops, training (grad enabled, adapter tensors trainable): recompose ~ 2 * build (the delta and its gradient
G @ V) + tokens * out * in (the weight gradient); factored ~ 3 * tokens * projections. Inference: build against
tokens * projections. ``build`` and ``projections`` come from each adapter's basis (`SVDBasis.flops`: a
one-sided basis adds a small x small core to the build and saves projections on its derived side). The
factored path also runs more and thinner kernels (two projections, an add; their backward), each charged
`FACTORED_OP_FLOPS`.

`FACTORED_OP_FLOPS` was measured on this project's 2-core x86-64 CPU (no AVX-512, torch 2.13.0+cpu), on the
tiny UNet (benchmarks/train_step.py --config tiny, 2026-11): thin r-channel convolutions lose to one ``addmm``
plus the weight gradient even where they save several million flops. On a GPU the per-kernel overhead is
different; no GPU figure exists yet.
"""

from __future__ import annotations

from typing import Iterable, Tuple

FACTORED_OP_FLOPS = 2**22


def factored_is_cheaper(flops: Iterable[Tuple[int, int, int]], shape: Tuple[int, int], tokens: int,
                        training: bool) -> bool:
    """``flops``: (build, projections per token, thin kernels) per live adapter (`SVDBasis.flops`)."""
    out_f, in_f = shape
    build = project = kernels = 0
    for b, p, k in flops:
        build, project, kernels = build + b, project + p, kernels + (2 + 3 * training) * k
    recompose = build * (2 if training else 1) + (tokens * out_f * in_f if training else 0)
    factored = tokens * project * (3 if training else 1)
    return factored + kernels * FACTORED_OP_FLOPS < recompose
