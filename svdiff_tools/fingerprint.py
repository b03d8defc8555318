"""Fingerprints of base weights, so an adapter refuses a base model it was not trained on.

A fingerprint is dtype-tolerant (an adapter trained on an fp32 UNet must load into the same UNet in
fp16/bf16): shape, Frobenius norm, sum and 16 entries at positions fixed by the shape. Two weights
match when every number agrees within 2% of the weight's scale; bf16 rounding is 0.4%, while weights of
a different model differ by O(100%). The numbers are kept to DIGITS significant digits (a relative error of
5e-7, far inside the tolerance; the sum's, relative to the norm, stays below it up to 1.6e9 entries): a
fingerprint is JSON in every adapter file, and full float64 reprs made two thirds of a small adapter's bytes.
"""

from __future__ import annotations

import math
import random

import torch

SAMPLES = 16
RTOL = 2e-2
DIGITS = 6


def _short(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def sample_positions(numel: int) -> list[int]:
    rng = random.Random(numel)
    return [rng.randrange(numel) for _ in range(min(SAMPLES, numel))]


def fingerprint(weight: torch.Tensor) -> dict:
    w = weight.detach().reshape(-1)
    w64 = w.to(torch.float64)
    pos = sample_positions(w.numel())
    samples = w64[torch.tensor(pos, dtype=torch.long, device=w.device)].cpu().tolist() if pos else []
    return {
        "shape": list(weight.shape),
        "norm": _short(float(torch.linalg.vector_norm(w64))),
        "sum": _short(float(w64.sum())),
        "samples": [_short(v) for v in samples],
    }


def mismatch(expected: dict, weight: torch.Tensor) -> str | None:
    """None if ``weight`` matches ``expected``, else a short reason."""
    if list(expected.get("shape", [])) != list(weight.shape):
        return f"shape {list(weight.shape)} != {expected.get('shape')}"
    recorded = [expected.get("norm"), expected.get("sum"), *expected.get("samples", [None])]
    if len(expected.get("samples", [])) != min(SAMPLES, weight.numel()) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in recorded):
        return "the recorded fingerprint is damaged"
    actual = fingerprint(weight)
    norm = max(expected["norm"], actual["norm"])
    scale = norm / math.sqrt(max(weight.numel(), 1))
    if abs(actual["norm"] - expected["norm"]) > RTOL * norm:
        return f"Frobenius norm {actual['norm']:.6g} != {expected['norm']:.6g}"
    if abs(actual["sum"] - expected["sum"]) > RTOL * max(norm, 1e-30) + 1e-12:
        return f"sum {actual['sum']:.6g} != {expected['sum']:.6g}"
    for a, e in zip(actual["samples"], expected["samples"]):
        if abs(a - e) > RTOL * max(abs(e), scale) + 1e-12:
            return f"sampled entries differ ({a:.6g} != {e:.6g})"
    return None
