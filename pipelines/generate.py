#!/usr/bin/env python
"""Generate images with one or more SVD adapters.

    python pipelines/generate.py --base MODEL --adapter FILE[:WEIGHT] [--adapter ...] --prompt "a sks dog" \
        --num_images 4 --seed 0 --steps 30 --guidance 7.5 --scale 1.0 --out samples [--compare] [--fuse]

Writes ``img_000.png ...`` (and ``base_000.png ...`` with ``--compare``, rendered with the same seeds and
the adapters disabled) plus one labelled ``grid.png``. ``--base`` may be omitted when the adapter file
records its base model (the trainer writes it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import svdiff_tools.diffusers  # noqa: F401  (adds pipe.load_svd_adapter and friends)
from svdiff_tools.atomic import save_image
from svdiff_tools.errors import SVDAdapterError
from svdiff_trainer.images import labelled_grid
from svdiff_tools.diffusers.loaders import resolve_adapter_source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="base model: hub id or local folder (default: the adapter's recorded base)")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="an SVD adapter file or folder, optionally with a weight (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scale", type=float, default=1.0, help="per-call adapter strength (0 = base model)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="samples")
    p.add_argument("--compare", action="store_true", help="also render the base model with the same seeds")
    p.add_argument("--fuse", action="store_true", help="merge the adapters into the weights (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16" if torch.cuda.is_available() else "float32")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        p.error("--num_images and --steps must be at least 1")
    return args


def split_adapter(spec: str) -> tuple[str, float]:
    path, sep, weight = spec.rpartition(":")
    if sep and path and not path.endswith(":"):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def recorded_base(path: Path) -> str | None:
    with safe_open(str(path), "pt") as f:
        extra = (f.metadata() or {}).get("extra")
    return json.loads(extra).get("base_model") or None if extra else None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        adapters = [(resolve_adapter_source(p), w) for p, w in map(split_adapter, args.adapter)]
        base = args.base or (recorded_base(adapters[0][0]) if adapters else None)
        if not base:
            raise SVDAdapterError("no --base given and the adapter records no base model; pass --base MODEL.")
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=DTYPES[args.dtype]).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        names = [pipe.load_svd_adapter(path, adapter_name=f"adapter{i}") for i, (path, _) in enumerate(adapters)]
    except (SVDAdapterError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if names:
        pipe.set_svd_adapters(names, [w for _, w in adapters])
    call = {}
    params = inspect.signature(pipe.__call__).parameters
    scale_kw = next((k for k in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
                     if k in params), None)
    if args.fuse and names:
        pipe.fuse_svd_adapter(scale=args.scale)
    elif scale_kw and args.scale != 1.0:
        call[scale_kw] = {"scale": args.scale}
    for key, value in (("height", args.height), ("width", args.width), ("negative_prompt", args.negative_prompt)):
        if value is not None:
            call[key] = value
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def render(prefix: str) -> list:
        images = []
        for i in tqdm(range(args.num_images), desc=f"{prefix} images"):
            gen = torch.Generator(device="cpu").manual_seed(args.seed + i)
            img = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen,
                       **call).images[0]
            save_image(img, out / f"{prefix}_{i:03d}.png")
            images.append(img)
        return images

    rows, labels = [], []
    if args.compare:
        if args.fuse and names:
            pipe.unfuse_svd_adapter()
        pipe.disable_svd_adapters()
        rows.append(render("base"))
        labels.append(f"base: {base}")
        pipe.enable_svd_adapters()
        if args.fuse and names:
            pipe.fuse_svd_adapter(scale=args.scale)
    rows.append(render("img"))
    labels.append("adapted: " + ", ".join(f"{p.name}:{w:g}" for p, w in adapters) + f" (scale {args.scale:g})")
    grid = labelled_grid(rows, labels, caption=args.prompt)
    save_image(grid, out / "grid.png")
    print(f"wrote {len(rows) * args.num_images} images and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
