#!/usr/bin/env python
"""Pipeline time: base, SVD adapter unfused, fused, and the exported LoRA through diffusers, in one process.

    python benchmarks/inference.py --config tiny --device cpu --steps 10
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import svdiff_tools as st  # noqa: E402
import svdiff_tools.diffusers  # noqa: E402,F401  (pipe.fuse_svd_adapter)
from common import measure, table  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny"], default="tiny",
                   help="pipelines of real sizes need downloaded weights; the tiny one is built from configs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from svdiff_trainer.tiny import tiny_pipeline

    base = tiny_pipeline("sd15").to(args.device)
    base.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=args.steps, height=32, width=32, output_type="np")

    def timed(pipe):
        return measure(lambda: pipe("a photo of sks toy", generator=torch.Generator().manual_seed(0), **kwargs),
                       args.device, 1, args.repeats)[0]

    adapted = copy.deepcopy(base)
    st.inject_adapter(adapted.unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet"))
    with torch.no_grad():
        for prm in st.model.adapter_parameters(adapted.unet, "default").values():
            prm.normal_(0, 0.05)
    folder = Path(tempfile.mkdtemp())
    st.export_lora(adapted, folder / "lora.safetensors")
    rows = [["base pipeline", timed(base)], ["SVD adapter, unfused", timed(adapted)]]
    adapted.fuse_svd_adapter()
    rows.append(["SVD adapter, fused", timed(adapted)])
    lora = copy.deepcopy(base)
    lora.load_lora_weights(str(folder / "lora.safetensors"))
    rows.append(["exported LoRA (diffusers, unfused)", timed(lora)])
    lora.fuse_lora()
    rows.append(["exported LoRA, fused", timed(lora)])
    floor = rows[0][1]
    print(f"tiny SD pipeline, {args.steps} steps at 32 px, device {args.device}, median of {args.repeats}")
    print(table([[r[0], f"{r[1]:.1f}", f"{r[1] / floor:.2f}x"] for r in rows], ["pipeline", "ms", "ratio to base"]))


if __name__ == "__main__":
    main()
