#!/usr/bin/env python
"""Forward + backward time of one adapted layer against its base layer and a PEFT LoRA layer, in one process.

    python benchmarks/layer_step.py [--repeats 300]

The per-layer overhead that the UNet table multiplies by the number of adapted layers. Rows: base layer
(input gradient only), PEFT LoRA r4 (Linear only), and svfit r=4 / svdiff on each forward path, with the
recomposed weight kept or rebuilt in backward; svdiff with the default storage (both factors on these small
weights) and with a one-sided basis (U stored and V derived from W; out > in: V stored, U derived). Run with
OMP_NUM_THREADS=1 for stable numbers on small CPUs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import svdiff_tools as st  # noqa: E402
from common import table  # noqa: E402
from svdiff_tools.forward_paths import Recomposed  # noqa: E402


def per_call_us(fn, repeats: int) -> float:
    for _ in range(max(1, repeats // 10)):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t) / repeats * 1e6)
    return best


def fwd_bwd(module: nn.Module, x: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        y = module(x.detach().requires_grad_(True))
        y.sum().backward()
        for p in params:
            p.grad = None
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cases = [("Linear 32x32, 16 tokens", nn.Linear(32, 32), torch.randn(1, 16, 32)),
             ("Linear 320x320, 256 tokens", nn.Linear(320, 320), torch.randn(1, 256, 320)),
             ("Linear 320->1280, 256 tokens", nn.Linear(320, 1280), torch.randn(1, 256, 320)),
             ("Conv2d 3x3 32->32, 8x8", nn.Conv2d(32, 32, 3, padding=1), torch.randn(1, 32, 8, 8))]
    rows = []
    for label, base, x in cases:
        base.requires_grad_(False)
        ref = per_call_us(fwd_bwd(base, x), args.repeats)
        rows.append([label, "base layer", f"{ref:.0f}", "1.00x"])
        variants = []
        if isinstance(base, nn.Linear):
            from peft import LoraConfig, get_peft_model

            variants.append(("PEFT LoRA r4", get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                                            LoraConfig(r=4, target_modules=["0"])), None))
        methods = (("svfit r=4", dict(method="svfit", rank=4)), ("svdiff", dict(method="svdiff")),
                   ("svdiff one-sided", dict(method="svdiff", basis_storage="one_sided")))
        for name, method in methods:
            for mode, rebuild in (("factored", None), ("recompose", False), ("recompose", True)):
                model = nn.Sequential(copy.deepcopy(base))
                st.inject_adapter(model, st.SVDAdapterConfig(target_modules=["0"], forward_mode=mode, **method))
                suffix = "" if rebuild is None else (", W' rebuilt in backward" if rebuild else ", W' kept")
                variants.append((f"{name}, {mode}{suffix}", model, rebuild))
        for name, model, rebuild in variants:
            original = Recomposed.rebuild_in_backward
            if rebuild is not None:
                Recomposed.rebuild_in_backward = lambda self, layer, w, live, on=rebuild: on
            try:
                us = per_call_us(fwd_bwd(model, x), args.repeats)
            finally:
                Recomposed.rebuild_in_backward = original
            rows.append([label, name, f"{us:.0f}", f"{us / ref:.2f}x"])
    print(f"torch threads {torch.get_num_threads()}, best of 5 x {args.repeats} calls")
    print(table(rows, ["layer", "configuration", "fwd+bwd us", "ratio to base"]))


if __name__ == "__main__":
    main()
