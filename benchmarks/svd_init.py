#!/usr/bin/env python
"""Cold and warm decomposition time of a whole UNet, per route, in one process.

    python benchmarks/svd_init.py --config tiny|sd15|sdxl --device cpu|cuda

Cold: the on-disk cache is empty (a fresh folder). Warm: the same injection again, served from the cache
(its cost is hashing the exact weight bytes, spread over threads, and reading the factors back).
Routes: the full spectrum every full-spectrum method needs, through the float64 Gram eigendecomposition (the
default) and through LAPACK/cuSOLVER's SVD, and the seeded randomised top-16 SVD of svfit r=16. Accuracy of
each route is printed too, over the components adapters use (those above the numerical rank): max
orthogonality error of U and V, relative reconstruction error of the full-spectrum routes in float64.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import svdiff_tools as st  # noqa: E402
from common import build_unet, sync, table  # noqa: E402
from svdiff_tools import decomposition as dec  # noqa: E402


def inject_time(base, config, device) -> float:
    model = copy.deepcopy(base)
    gc.collect()
    sync(device)
    t = time.perf_counter()
    st.inject_adapter(model, config)
    sync(device)
    return time.perf_counter() - t


ROUTES = {"gram": dec.gram_svd, "full": dec.full_svd}


def accuracy(base, driver, rank) -> tuple[float, float]:
    worst_orth = worst_rec = 0.0
    for _, module in st.targets.resolve_targets(base, "all"):
        W = module.weight.detach().reshape(module.weight.shape[0], -1).float()
        d = dec.randomized_svd(W, min(rank, min(W.shape))) if rank else ROUTES[driver](W)
        n = dec.numerical_rank(d.S.float(), tuple(W.shape))
        U, S, V = d.U[:, :n].double(), d.S[:n].double(), d.V[:, :n].double()
        eye = torch.eye(n, device=W.device, dtype=torch.float64)
        worst_orth = max(worst_orth, float((U.T @ U - eye).abs().max()), float((V.T @ V - eye).abs().max()))
        if not rank:
            rec = (U * S) @ V.T
            worst_rec = max(worst_rec, float((rec - W.double()).norm() / W.double().norm()))
    return worst_orth, worst_rec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "sd15", "sdxl"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", default="", help="comma-separated routes to leave out: gram, full, randomized")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base, _ = build_unet(args.config, args.device, torch.float32)
    routes = [("gram", "Gram eigh, float64 (svdiff, all)", st.SVDAdapterConfig(method="svdiff", target_modules="all"),
               None),
              ("full", "LAPACK SVD, float32 (svdiff, all)",
               st.SVDAdapterConfig(method="svdiff", target_modules="all", svd_driver="full"), None),
              ("randomized", "randomised top-16 (svfit r=16, all)",
               st.SVDAdapterConfig(method="svfit", rank=16, target_modules="all", exclude_modules=["conv_out"],
                                    svd_driver="randomized"), 16)]  # conv_out has only 4 outputs
    rows = []
    for driver, label, config, rank in routes:
        if driver in skip:
            continue
        with tempfile.TemporaryDirectory() as cache:
            os.environ["SVDIFF_TOOLS_CACHE"] = cache
            cold = inject_time(base, config, args.device)
            warm = inject_time(base, config, args.device)
        orth, rec = accuracy(base, driver, rank)
        rows.append([label, f"{cold:.2f}", f"{warm:.2f}", f"{cold / warm:.1f}x", f"{orth:.1e}",
                     "-" if rank else f"{rec:.1e}"])
    n = len(st.targets.resolve_targets(base, "all"))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"config {args.config}: {n} conv/linear weights, float32 decompositions, device {device_name}")
    print(table(rows, ["route", "cold s", "warm s", "cold/warm", "max abs(U^T U - I)", "rel. reconstruction"]))


if __name__ == "__main__":
    main()
