#!/usr/bin/env python
"""Single-image editing with spectral shifts (SVDiff's CoSINE): fine-tune on one image, invert it with DDIM,
generate from the inverted noise with an edited prompt.

    python pipelines/edit.py IMAGE --prompt "a purple star toy" --edit "a purple star toy on a green background" \
        [--base MODEL] [--steps 150] [--lr 1e-3] [--inference_steps 50] [--guidance 3] --out edits/

1. SVDiff spectral shifts on every UNet layer (the paper's recipe) learn the image under ``--prompt`` for
   ``--steps`` steps (epsilon loss over random timesteps); the base weights stay untouched.
2. DDIM inversion of the image's latents under ``--prompt`` (no guidance) gives the noise that regenerates it.
3. DDIM sampling from that noise under ``--edit`` (classifier-free guidance ``--guidance``) gives the edit.

Writes ``edited.png``, ``reconstruction.png`` (the inverted noise under ``--prompt``) and ``grid.png`` (source,
reconstruction, edit). ``--base`` defaults to the embedded toy-world pipeline.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import svdiff_tools as st
from svdiff_tools.atomic import save_image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("image")
    p.add_argument("--prompt", required=True, help="what the image shows")
    p.add_argument("--edit", required=True, help="the edited prompt")
    p.add_argument("--base", default=None, help="diffusers pipeline (default: the embedded toy world)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps on the image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inference_steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="edits")
    args = p.parse_args(argv)
    for name in ("steps", "inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1.")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr {args.lr} must be a positive number, e.g. 1e-3.")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        p.error(f"--guidance {args.guidance} must be a finite number of at least 0 (1 = no guidance).")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; pass a folder for the edited images.")
    return args


def load_pipeline(base):
    from diffusers import DDIMScheduler, DiffusionPipeline

    if base is None:
        from svdiff_toyworld.preset import available, pipeline_folder

        if not available():
            raise SystemExit("no --base given and the toy-world pipeline is not shipped; pass --base MODEL.")
        base = pipeline_folder()
    try:
        pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
    except Exception as exc:  # a missing folder, an unreachable hub id, a folder of another kind
        raise SystemExit(f"error: --base {base} cannot be loaded as a diffusers pipeline ({type(exc).__name__}); "
                         "pass a local pipeline folder or a reachable hub id.") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_latents(pipe, image: Image.Image) -> torch.Tensor:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    x = torch.from_numpy(np.array(image.convert("RGB").resize((size, size)))).float()
    x = x.permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor


def text(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def fine_tune(pipe, latents: torch.Tensor, prompt: str, steps: int, lr: float, seed: int) -> None:
    """SVDiff spectral shifts on the UNet, trained to denoise this one image under ``prompt``."""
    st.inject_adapter(pipe.unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet"), "edit")
    optimizer = torch.optim.AdamW(st.get_parameter_groups(pipe.unet, lr=lr), weight_decay=0.0)
    cond = text(pipe, prompt)
    scheduler = pipe.scheduler
    g = torch.Generator().manual_seed(seed)
    pipe.unet.train()
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(pipe.unet(noisy, t, cond).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    pipe.unet.eval()


@torch.no_grad()
def ddim_invert(pipe, latents: torch.Tensor, prompt: str, steps: int) -> torch.Tensor:
    """x_0 -> x_T along DDIM's deterministic path under ``prompt`` (no guidance)."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    cond = text(pipe, prompt)
    x = latents.clone()
    for t in inverse.timesteps:
        x = inverse.step(pipe.unet(x, t, cond).sample, t, x).prev_sample
    return x


def edit(pipe, image: Image.Image, prompt: str, edited: str, steps: int = 150, lr: float = 1e-3,
         inference_steps: int = 50, guidance: float = 3.0, seed: int = 0):
    """(edited image, reconstruction); leaves ``pipe`` with the fine-tuned spectral shifts ("edit")."""
    latents = image_latents(pipe, image)
    fine_tune(pipe, latents, prompt, steps, lr, seed)
    noise = ddim_invert(pipe, latents, prompt, inference_steps)
    call = dict(num_inference_steps=inference_steps, latents=noise)
    reconstruction = pipe(prompt, guidance_scale=1.0, **call).images[0]
    result = pipe(edited, guidance_scale=guidance, **call).images[0]
    return result, reconstruction


def main(argv=None) -> int:
    args = parse_args(argv)
    from svdiff_trainer.args import TrainingInputError
    from svdiff_trainer.data import open_rgb

    try:  # EXIF rotation, every colour mode, decompression bombs: as the trainer reads images
        image = open_rgb(Path(args.image))
    except TrainingInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.base)
    result, reconstruction = edit(pipe, image, args.prompt, args.edit, args.steps, args.lr, args.inference_steps,
                                  args.guidance, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image(result, out / "edited.png")
    save_image(reconstruction, out / "reconstruction.png")
    from svdiff_trainer.images import labelled_grid

    size = result.size
    save_image(labelled_grid([[image.resize(size), reconstruction, result]], ["source | reconstruction | edit"],
                             caption=f"{args.prompt} -> {args.edit}"), out / "grid.png")
    print(f"wrote {out / 'edited.png'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
