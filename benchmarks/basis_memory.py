#!/usr/bin/env python
"""Stored basis bytes of a full-spectrum adapter on the `unet` preset, per `basis_storage`, as a fraction of
the UNet's weight bytes, from the config alone (a meta-device model: no weights, no decomposition).

    python benchmarks/basis_memory.py --config sd15|sdxl|tiny

Two-sided: ``(out + in) * q`` elements per layer (q = min(out, in)); one-sided: ``q * q + max(out, in) * tail``
with the tail (components with sigma_i < sigma_1 / 8, whose larger-side column stays stored) taken as empty,
so one-sided figures are lower bounds (the tiny UNet's random weights keep 7% of their components in the tail:
0.28x stored against a bound of 0.26x). S (q) is counted in both. Which layers are one-sided follows
`SVDBasis.worth_one_sided` and each layer's `ModuleKind`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_unet, table  # noqa: E402
from svdiff_tools.basis import SVDBasis  # noqa: E402
from svdiff_tools.module_kinds import kind_of  # noqa: E402
from svdiff_tools.targets import resolve_targets  # noqa: E402


def stored_elements(unet, storage: str) -> dict:
    """{"left" | "right" | "two-sided": stored elements} over the `unet` preset's layers."""
    counts = {"left": 0, "right": 0, "two-sided": 0}
    for _, module in resolve_targets(unet, "unet"):
        kind = kind_of(module)
        out_f, in_f = kind.matrix_shape
        q = min(out_f, in_f)
        if storage != "both" and SVDBasis.worth_one_sided(storage, (out_f, in_f), kind.supports_input_correction()):
            counts["right" if out_f > in_f else "left"] += q * q + q
        else:
            counts["two-sided"] += (out_f + in_f) * q + q
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "sd15", "sdxl"], default="sd15")
    args = p.parse_args(argv)
    with torch.device("meta"):
        unet, _ = build_unet(args.config, "meta", torch.float32)
    weights = sum(p.numel() for p in unet.parameters())
    rows = []
    for storage in ("both", "auto", "one_sided"):
        c = stored_elements(unet, storage)
        rows.append([storage, f"{sum(c.values()) / weights:.2f}x", f"{c['left'] / weights:.2f}x",
                     f"{c['right'] / weights:.2f}x", f"{c['two-sided'] / weights:.2f}x"])
    print(f"config {args.config}: {weights / 1e6:.1f}M weights; stored bases, ratio to the UNet's weights "
          "(same dtype)")
    print(table(rows, ["basis_storage", "stored", "one-sided, U stored", "one-sided, V stored", "two-sided"]))


if __name__ == "__main__":
    main()
