"""Images the trainer makes: class images for prior preservation, validation images, the final check."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from .args import list_images


def generate_class_images(args, load_pipeline, accelerator, weight_dtype) -> None:
    """Top up --class_data_dir to --num_class_images with the base model (never regenerates)."""
    from tqdm.auto import tqdm

    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    missing = args.num_class_images - len(list_images(folder))
    if missing <= 0:
        return
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.prior_generation_precision, weight_dtype)
    pipe = load_pipeline(torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    start = len(list_images(folder))
    with tqdm(total=missing, desc="generating class images", disable=not accelerator.is_local_main_process) as bar:
        done = 0
        while done < missing:
            n = min(args.sample_batch_size, missing - done)
            gen = torch.Generator().manual_seed((args.seed or 0) + start + done)
            images = pipe([args.class_prompt] * n, num_inference_steps=args.num_inference_steps,
                          height=args.resolution, width=args.resolution, generator=gen).images
            for i, img in enumerate(images):
                img.save(folder / f"class_{start + done + i:05d}.png")
            done += n
            bar.update(n)
    del pipe


def render_validation(args, pipe, step: int, folder: Path, accelerator=None):
    """Generate --num_validation_images with fixed seeds; save them and return the PIL images."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(args.num_validation_images):
        gen = torch.Generator().manual_seed((args.seed or 0) + i)
        img = pipe(args.validation_prompt, num_inference_steps=args.num_inference_steps, height=args.resolution,
                   width=args.resolution, generator=gen).images[0]
        img.save(folder / f"step{step:06d}_{i}.png")
        images.append(img)
    if accelerator is not None:
        import numpy as np

        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                          dataformats="NHWC")
    return images


def final_check_and_card(args, base: str, backend, files: list, output_dir: Path, trainable: int, steps: int,
                         load_pipeline) -> Path:
    """Reload the saved adapter into a fresh base pipeline, render the final images, write the model card."""
    import svdiff_tools  # noqa: F401  (the loader methods)

    from .card import write_model_card
    from .images import labelled_grid

    pipe = load_pipeline()
    backend.load_into(pipe, files)
    images = render_validation(args, pipe, steps, output_dir / "validation", None)
    grid = output_dir / "grid.png"
    labelled_grid([images], [f"{args.method}, step {steps}"], caption=args.validation_prompt).save(grid)
    command = "accelerate launch train_dreambooth.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_model_card(output_dir, base_model=base if not args.embedded_model else "embedded tiny Stable Diffusion",
                     method=args.method, trainable=trainable, adapter_file=files[0],
                     instance_prompt=args.instance_prompt, validation_prompt=args.validation_prompt, steps=steps,
                     grid=grid, extra_files=files[1:], command=command)
    return grid
