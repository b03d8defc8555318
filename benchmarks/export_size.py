#!/usr/bin/env python
"""LoRA export sizes: what users get when they export an SVD adapter.

    python benchmarks/export_size.py --config sd15          # exact kohya exports of a full-spectrum adapter, sizes
    python benchmarks/export_size.py --adapter FILE [--base MODEL] [--prompt P]   # rank vs size vs images

``--config``: a full-spectrum adapter (svdiff/vectorfit) on random weights is full rank, so its exact LoRA
has rank ``min(out, in)`` per layer and the file's size follows from the shapes alone (meta device, no weights):
per-layer ranks (`export_lora` now) against every pair zero-padded to the file's largest rank (before issue 17),
for the ``unet-attention`` and ``unet`` presets plus the text encoder (SD-1.5: the real UNet config with
``cross_attention_dim=768`` and a CLIP-L-sized text encoder). ``tests/test_export_sizes.py`` checks the same
arithmetic against a real file.

``--adapter``: export a trained adapter at several ranks (exact, energy fractions, fixed ranks) and render the
same prompt and seeds with the unexported adapter and with each LoRA loaded by ``load_lora_weights``:
file size, overall relative error, and the image difference (max abs in [0, 1], PSNR) against the adapter.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def sd15_components():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD-1.5's UNet config (the diffusers defaults)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, projection_dim=768))
    return unet, text


def exact_pairs(model, targets):
    """(out, in, rank) of each targeted layer's exact LoRA pair for a full-rank delta."""
    from svdiff_tools.module_kinds import kind_of
    from svdiff_tools.targets import resolve_targets

    out = []
    for _, module in resolve_targets(model, targets):
        o, i = kind_of(module).matrix_shape
        out.append((o, i, min(o, i)))
    return out


def kohya_bytes(pairs, padded: bool, itemsize: int = 4) -> int:
    top = max(r for _, _, r in pairs)
    return sum(((top if padded else r) * (o + i) + 1) * itemsize for o, i, r in pairs)


def sizes_table(config: str):
    if config != "sd15":
        raise SystemExit("--config sd15 is the layout the issue measured")
    unet, text = sd15_components()
    weights = {p: sum(o * i * 4 for o, i, _ in exact_pairs(unet, p)) for p in ("unet-attention", "unet")}
    te = exact_pairs(text, "text-encoder")
    te_weights = sum(o * i * 4 for o, i, _ in te)
    rows = []
    for preset in ("unet-attention", "unet"):
        pairs = exact_pairs(unet, preset) + te
        rows.append([f"{preset} + text-encoder", f"{len(pairs)}", f"{kohya_bytes(pairs, True) / 1e9:.2f}",
                     f"{kohya_bytes(pairs, False) / 1e9:.2f}", f"{(weights[preset] + te_weights) / 1e9:.2f}"])
    print(table(rows, ["targets (svdiff, exact, kohya keys, fp32)", "pairs", "padded GB (before)",
                       "per-layer GB (now)", "weights modified GB"]))


def rank_table(adapter: str, base: str, prompt: str, seeds: int):
    import numpy as np
    from diffusers import DiffusionPipeline

    import svdiff_tools as st
    import svdiff_tools.diffusers  # noqa: F401  (pipe.load_svd_adapter)

    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=25, output_type="np")

    def render(p):
        return np.concatenate([p(prompt, generator=torch.Generator().manual_seed(s), **kwargs).images
                               for s in range(seeds)])

    base_images = render(pipe)
    adapted = copy.deepcopy(pipe)
    adapted.load_svd_adapter(adapter)
    reference = render(adapted)
    effect = float(np.abs(reference - base_images).mean())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (None, 0.999, 0.99, 0.95, 0.9, 0.8, 16, 4):
            path = Path(tmp) / "lora.safetensors"
            report = st.export_lora(adapter, path, base=pipe, rank=rank)
            lora = copy.deepcopy(pipe)
            lora.load_lora_weights(str(path))
            images = render(lora)
            diff = float(np.abs(images - reference).max())
            mse = float(((images - reference) ** 2).mean())
            psnr = 10 * math.log10(1 / mse) if mse > 0 else float("inf")
            ranks = list(report.ranks.values())
            rows.append(["exact" if rank is None else f"{rank:g}", f"{min(ranks)}-{max(ranks)}",
                         f"{report.file_bytes / 2**20:.2f}", f"{report.overall_error:.2e}", f"{diff:.4f}",
                         f"{psnr:.1f}"])
    print(f"adapter {adapter} on {base}; prompt {prompt!r}, {seeds} seeds, 25 steps; mean |adapted - base| = "
          f"{effect:.4f} (pixel values in [0, 1])")
    print(table(rows, ["rank", "layer ranks", "file MiB", "rel. error", "max |image - adapter|", "PSNR dB"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--base", default=None, help="default: the adapter's recorded base model")
    p.add_argument("--prompt", default="a photo of sks toy")
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    if args.adapter:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
        from generate import recorded_base

        rank_table(args.adapter, args.base or recorded_base(Path(args.adapter)), args.prompt, args.seeds)
    else:
        sizes_table(args.config or "sd15")


if __name__ == "__main__":
    main()
