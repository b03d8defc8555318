#!/usr/bin/env python
"""Export an SVD adapter for tools that do not read it: as a LoRA file, as a fused pipeline, or as a fused UNet.

    python pipelines/export.py --adapter out/svd_adapter.safetensors --lora lora.safetensors [--rank 0.99] \
        [--key_format diffusers|kohya]
    python pipelines/export.py --adapter out/svd_adapter.safetensors --fused fused_pipeline/
    python pipelines/export.py --adapter out/svd_adapter.safetensors --unet_file unet.safetensors

``--lora`` writes a LoRA any LoRA consumer loads (``--rank``: exact by default, an int per layer, or an energy
fraction such as 0.99; the report gives each layer's rank and error and the file size). ``--fused`` writes a
whole diffusers pipeline folder with the adapter merged into its weights (``save_pretrained``), for tools that
read only full weights; ``--unet_file`` writes the merged UNet alone as one ``.safetensors`` in diffusers
layout. ``--base`` may be omitted when the adapter records its base model (the trainer writes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import svdiff_tools as st
from svdiff_tools.errors import SVDAdapterError
from svdiff_tools.export import rank_argument
from svdiff_tools.diffusers.loaders import resolve_adapter_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import DTYPES, recorded_base  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="an SVD adapter file or folder")
    p.add_argument("--base", help="base model: hub id or local folder (default: the adapter's recorded base)")
    p.add_argument("--lora", help="write a LoRA file here")
    p.add_argument("--rank", type=rank_argument, default=None,
                   help="--lora: exact (default, or 0), an int, or an energy fraction in (0, 1]")
    p.add_argument("--key_format", choices=["diffusers", "kohya"], default="diffusers")
    p.add_argument("--fused", help="write the pipeline with the adapter merged into its weights to this folder")
    p.add_argument("--unet_file", help="write the merged denoiser alone as one .safetensors file")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength merged into --fused / --unet_file")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights of the written files")
    args = p.parse_args(argv)
    if not (args.lora or args.fused or args.unet_file):
        p.error("give at least one of --lora, --fused, --unet_file")
    args.rank = args.rank or None  # 0 = exact
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        path = resolve_adapter_source(args.adapter)
        base = args.base or recorded_base(path)
        if not base:
            raise SVDAdapterError("no --base given and the adapter records no base model; pass --base MODEL.")
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
        if args.lora:
            report = st.export_lora(path, args.lora, base=pipe, rank=args.rank, key_format=args.key_format,
                                    dtype=DTYPES[args.dtype])
            print(report)
        if args.fused or args.unet_file:
            pipe.load_svd_adapter(path)
            pipe.merge_and_unload_svd_adapter(scale=args.scale)
            pipe.to(DTYPES[args.dtype])
            if args.fused:
                pipe.save_pretrained(args.fused, safe_serialization=True)
                print(f"wrote the fused pipeline to {args.fused}")
            if args.unet_file:
                from svdiff_tools.atomic import save_safetensors

                denoiser = getattr(pipe, "unet", None) or pipe.transformer
                save_safetensors({k: v.contiguous() for k, v in denoiser.state_dict().items()}, args.unet_file,
                                 {"format": "pt"})
                print(f"wrote the fused {type(denoiser).__name__} to {args.unet_file}")
    except (SVDAdapterError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
