#!/usr/bin/env python
"""One UNet training step (forward, backward, AdamW step) per configuration, all in one process.

    python benchmarks/train_step.py --config tiny|sd15|sdxl --device cpu|cuda --resolution 512 --batch 1

Rows: the frozen floor (backward through activations only, no weight gradients; no adapter can beat it),
full fine-tuning, PEFT LoRA r4 on to_q/k/v/out with float32 adapter parameters (as diffusers' DreamBooth
script runs it), naive SVDiff (rebuilds every weight from its factors each step), and each method at its
default and at a low-rank setting. Columns: median step ms, ratio to the floor, peak memory and its ratio to
the floor's (CUDA: max_memory_allocated; CPU: resident weights, buffers and optimizer state plus the tracked
peak of one extra step, see `common.PeakBytes`), the memory above the floor in units of the UNet's weight
bytes (issue 5's full-spectrum goal: <= 1.0), trainable parameters. The last line is
``worst adapter ratio to floor: X.XX``. The adapters go into the frozen model and out again after their row
(full fine-tuning, LoRA and naive SVDiff run on copies), so SDXL in float32 fits a 24 GiB CPU machine when
those three rows are skipped.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import svdiff_tools as st  # noqa: E402
from common import build_unet, cpu_peak_gib, measure, table  # noqa: E402

def method_rows(config: str) -> list:
    """(label, config kwargs); target_modules "unet" = attention + resnets + projections. The tiny UNet's
    smallest matrices have k = 32, so its low-rank rows use r = 4 and 16 instead of 16 and 64."""
    low, high = (4, 16) if config == "tiny" else (16, 64)
    return [
        ("svdiff", dict(method="svdiff")),
        ("svdiff (U and V kept)", dict(method="svdiff", basis_storage="both")),
        ("svdiff (all one-sided)", dict(method="svdiff", basis_storage="one_sided")),
        ("vectorfit", dict(method="vectorfit")),
        ("svft plain", dict(method="svft", svft_pattern="plain")),
        ("svft banded d=2", dict(method="svft", svft_pattern="banded", svft_offset=2)),
        (f"svfit r={low}", dict(method="svfit", rank=low)),
        (f"svfit r={high}", dict(method="svfit", rank=high)),
        (f"svft banded r={low}", dict(method="svft", svft_pattern="banded", svft_offset=2, rank=low)),
    ]


class NaiveSpectralShift(nn.Module):
    """The SVDiff port's way: W = U diag(relu(sigma + delta)) V^T rebuilt from float32 factors every step."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        shape = weight.shape
        U, S, Vh = torch.linalg.svd(weight.detach().float().reshape(shape[0], -1), full_matrices=False)
        self.register_buffer("U", U)
        self.register_buffer("S", S)
        self.register_buffer("Vh", Vh)
        self.delta = nn.Parameter(torch.zeros_like(S))
        self.shape = shape

    def forward(self, _weight):
        W = (self.U * torch.relu(self.S + self.delta)) @ self.Vh
        return W.reshape(self.shape).to(_weight.dtype)


def naive_svdiff(unet):
    for name, module in st.targets.resolve_targets(unet, "unet"):
        parametrize.register_parametrization(module, "weight", NaiveSpectralShift(module.weight))
    return [p for n, p in unet.named_parameters() if n.endswith(".delta")]


def make_step(unet, inputs, params, floor=False):
    latents, t, text, extra = inputs
    # foreach=True is what AdamW picks by itself for CUDA tensors; forcing it on the CPU too keeps the CPU
    # table about the layers rather than about a per-tensor Python loop that no GPU user runs.
    optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=True) if params else None

    def step():
        x = latents.detach().requires_grad_(floor)
        loss = F.mse_loss(unet(x, t, text, **extra).sample.float(), latents.float())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def resident():  # what lives between steps: weights, buffers, optimizer state
        yield from unet.parameters()
        yield from unet.buffers()
        for state in (optimizer.state.values() if optimizer is not None else ()):
            yield from state.values()
    step.resident = resident
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "sd15", "sdxl"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 tiny, 512 sd15, 1024 sdxl")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="frozen weights (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip", default="", help="comma-separated row labels to leave out")
    p.add_argument("--plot", default=None, help="also write a bar chart of the step times to this PNG")
    args = p.parse_args(argv)
    resolution = args.resolution or {"tiny": 32, "sd15": 512, "sdxl": 1024}[args.config]
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    base, make_inputs = build_unet(args.config, args.device, dtype)
    base.requires_grad_(False)
    inputs = make_inputs(args.batch, resolution)
    rows, results, peaks = [], {}, {}
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())

    def run(label, unet, params, floor=False):
        if label in skip:
            return
        unet.train()
        step = make_step(unet, inputs, params, floor)
        ms, peak = measure(step, args.device, args.warmup, args.repeats)
        if peak is None:  # CPU: resident bytes + the tracked peak of one extra, untimed step
            peak = cpu_peak_gib(step, step.resident)
        results[label] = ms
        peaks[label] = peak
        trainable = sum(p.numel() for p in params)
        extra = (peak - peaks["frozen floor"]) * 2**30 / weight_bytes
        rows.append([label, f"{ms:.1f}", f"{ms / results['frozen floor']:.2f}x", f"{peak * 1024:.1f}",
                     f"{peak / peaks['frozen floor']:.2f}x", f"{extra:.2f}", f"{trainable:,}"])
        print(f"  {label}: {ms:.1f} ms", file=sys.stderr)

    run("frozen floor", base, [], floor=True)
    full = copy.deepcopy(base).requires_grad_(True)
    run("full fine-tuning", full, list(full.parameters()))
    del full
    if "PEFT LoRA r4" not in skip:
        from peft import LoraConfig

        lora = copy.deepcopy(base)
        lora.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in lora.parameters() if p.requires_grad]
        for p_ in params:
            p_.data = p_.data.float()  # diffusers' cast_training_params(..., torch.float32)
        run("PEFT LoRA r4", lora, params)
        del lora
    if "naive svdiff" not in skip:
        naive = copy.deepcopy(base)
        run("naive svdiff", naive, naive_svdiff(naive))
        del naive
    methods = method_rows(args.config)
    for label, kwargs in methods:  # into the frozen model itself and out again: no second copy of the weights
        if label in skip:
            continue
        st.inject_adapter(base, st.SVDAdapterConfig(target_modules="unet", **kwargs))
        run(label, base, [p for p in base.parameters() if p.requires_grad])
        st.remove_adapter(base)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"config {args.config}, {resolution} px, batch {args.batch}, frozen weights {dtype}, device {device_name}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(table(rows, ["configuration", "step ms", "ratio to floor", "peak MiB", "memory to floor",
                       "(peak - floor) / weights", "trainable params"]))
    if args.plot:
        from plot import step_time_chart

        step_time_chart(results, f"UNet training step, {args.config} {resolution} px, batch {args.batch}, "
                                 f"{str(dtype).split('.')[-1]}, {device_name}", args.plot)
    adapters = [results[label] for label, _ in methods if label in results]
    worst = max(adapters) / results["frozen floor"] if adapters else float("nan")
    print(f"worst adapter ratio to floor: {worst:.2f}")


if __name__ == "__main__":
    main()
