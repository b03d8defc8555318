"""Images the trainer makes: class images for prior preservation, validation images, the final check."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from ..atomic import remove_orphans, save_image, write_text
from .args import TrainingInputError, list_images

logger = logging.getLogger(__name__)


CLASS_RECORD = ".class_images.json"


def class_images_made_by(args, base: str, prompt: str) -> dict:
    """What makes class images, as recorded beside them: the base model (a local folder as its absolute path),
    its revision and variant, the class prompt and the resolution."""
    local = Path(base).expanduser()
    return {"base": str(local.resolve()) if local.exists() else base, "revision": args.revision,
            "variant": args.variant, "prompt": prompt, "resolution": args.resolution}


def check_class_images(folder: Path, made_by: dict) -> None:
    """Refuse a class-image folder whose record (``.class_images.json``) names another base model, revision,
    variant, prompt or resolution than this run's; warn once when images are there without a record (the user's
    own photos, or made by an older svdiff-tools): prior preservation then trusts them as they are."""
    folder = Path(folder)
    record = folder / CLASS_RECORD
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))["made_by"]
        except Exception:
            recorded = None
        if not isinstance(recorded, dict):
            raise TrainingInputError(f"{record} (what made the class images in {folder}) is unreadable; delete that "
                                     "folder to have the class images regenerated, or pass another "
                                     "--class_data_dir.") from None
        for key, value in made_by.items():
            if recorded.get(key) != value:
                raise TrainingInputError(f"--class_data_dir {folder} holds class images made with another {key} "
                                         f"({recorded.get(key)!r}; this run: {value!r}), which would train the prior "
                                         "on the wrong images; pass another --class_data_dir, or empty that folder "
                                         "to have them regenerated.")
    elif folder.is_dir() and (images := list_images(folder)):
        logger.warning("%d class images in %s carry no record of what made them (your own photos, or made by an "
                       "older svdiff-tools); prior preservation uses them as images of %r. Empty the folder to have "
                       "them regenerated with a record.", len(images), folder, made_by["prompt"])


def generate_class_images(args, load_pipeline, accelerator, weight_dtype, folder: Path, prompt: str,
                          made_by: dict) -> None:
    """Top up ``folder`` to --num_class_images images of ``prompt`` with the base model (never regenerates) and
    record ``made_by`` beside them (`check_class_images` reads it). Each image appears only when complete (an
    interrupted run leaves no truncated PNG for the next to count and read; runs sharing the folder write whole
    files)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder, older_than_s=3600)  # a killed run's temporary files, not a running one's
    missing = args.num_class_images - len(list_images(folder))
    if missing <= 0:
        return
    if not (folder / CLASS_RECORD).is_file():
        write_text(folder / CLASS_RECORD, json.dumps({"made_by": made_by, "unrecorded_images": len(
            list_images(folder))}, indent=2, sort_keys=True))
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
            images = pipe([prompt] * n, num_inference_steps=args.num_inference_steps,
                          guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                          generator=gen).images
            for i, img in enumerate(images):
                save_image(img, folder / f"class_{start + done + i:05d}.png")
            done += n
            bar.update(n)
    del pipe


def validation_seed(args) -> int:
    return args.validation_seed if args.validation_seed is not None else (args.seed or 0)


def validation_image_name(step: int, prompt_index: int, image_index: int) -> str:
    """``step{N}_{i}.png`` for the first validation prompt, ``step{N}_p{k}_{i}.png`` for prompt k."""
    prompt = f"_p{prompt_index}" if prompt_index else ""
    return f"step{step:06d}{prompt}_{image_index}.png"


def render_validation(args, pipe, step: int, folder: Path, accelerator=None) -> list:
    """--num_validation_images per validation prompt with fixed seeds (image i has seed ``validation_seed + i`` for
    every prompt), --sample_batch_size images per pipeline call (one generator per image, so batching does not
    change an image); saved as ``step{N}_{i}.png`` (first prompt) and ``step{N}_p{k}_{i}.png``. Returns one list of
    PIL images per prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    rows, first, n, batch = [], validation_seed(args), args.num_validation_images, max(1, args.sample_batch_size)
    for k, prompt in enumerate(args.validation_prompts):
        images = []
        for start in range(0, n, batch):
            seeds = range(first + start, first + min(n, start + batch))
            images += pipe([prompt] * len(seeds), num_inference_steps=args.num_inference_steps,
                           guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                           generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        for i, img in enumerate(images):
            save_image(img, folder / validation_image_name(step, k, i))
        rows.append(images)
    if accelerator is not None:
        import numpy as np

        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in rows[0]]), step,
                                          dataformats="NHWC")
    return rows


def training_settings(args, captioned: Optional[int] = None) -> dict:
    """What the command line may not show (the toy world and the method fill defaults): the model card's lines.
    ``captioned``: how many instance images had a caption file (None: not known)."""
    lr = f"{args.learning_rate:g} ({args.lr_scheduler}" + (f", {args.lr_warmup_steps} warmup steps)"
                                                           if args.lr_warmup_steps else ")")
    settings = {"learning rate": lr}
    if args.rank is not None:
        settings["rank"] = f"{args.rank:g}" + (" (share of each matrix's spectral energy)" if args.rank < 1 else "")
    settings["text encoder"] = "frozen" if not args.train_text_encoder else "adapted" + (
        f", learning rate {args.text_encoder_lr:g}" if args.text_encoder_lr else "")
    settings["batch size"] = args.train_batch_size * args.gradient_accumulation_steps
    if args.with_prior_preservation:
        settings["prior preservation"] = f"`{args.class_prompt}`, weight {args.prior_loss_weight:g}"
    files = f"{captioned} caption files, " if captioned else ""
    if args.caption_probability == 0.0:
        settings["captions"] = "not used (the instance prompt on every step)"
    elif captioned == 0:
        settings["captions"] = "none (no caption files: the instance prompt on every step)"
    elif args.caption_probability < 1.0:
        settings["captions"] = f"{files}used on {args.caption_probability:.0%} of steps (else the instance prompt)"
    elif captioned:
        settings["captions"] = f"{files}used on every step"
    return settings


def final_check_and_card(args, base: str, backend, files: list, output_dir: Path, trainable: int, steps: int,
                         load_pipeline, captioned: Optional[int] = None) -> Path:
    """Reload the saved adapter into a fresh base pipeline, render the final images, measure the subject on the
    toy world (embedded default), write the model card."""
    import svdiff_tools.diffusers  # noqa: F401  (the loader methods)

    from .card import write_model_card
    from .images import labelled_grid

    pipe = load_pipeline()
    backend.load_into(pipe, files)
    rows = render_validation(args, pipe, steps, output_dir / "validation", None)
    grid = output_dir / "grid.png"
    save_image(labelled_grid(rows, [f"{args.method}, step {steps}: {p}" for p in args.validation_prompts]), grid)
    report, subject = None, None
    if args.embedded_kind == "toyworld":
        from ..toyworld import dreambooth, evaluate

        subject = dreambooth.shipped_subject(args.instance_data_dir, args.instance_prompt)
        if subject is None:
            logging.getLogger("train_dreambooth").info(
                "no toy-world subject report: %s with `%s` is not a shipped subject under its own prompt (the "
                "metric network identifies only those)", args.instance_data_dir, args.instance_prompt)
    if subject is not None:
        first = validation_seed(args)
        rendered = dict(zip(args.validation_prompts, rows))  # the images just saved are the ones measured
        report = evaluate.dreambooth_report(pipe, load_pipeline, subject,
                                            seeds=range(first, first + args.num_validation_images),
                                            steps=args.num_inference_steps, guidance=args.guidance_scale,
                                            rendered=rendered, base_cache=dreambooth.base_report_cache())
        write_text(output_dir / "toyworld_report.json", json.dumps(report, indent=2))
        for line in evaluate.report_lines(report):
            logging.getLogger("train_dreambooth").info("%s", line)
    command = "accelerate launch train_dreambooth.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_model_card(output_dir, base_model=base, embedded=args.embedded_kind, method=args.method,
                     trainable=trainable, adapter_file=files[0], instance_prompt=args.instance_prompt,
                     validation_prompt=args.validation_prompts[0], steps=steps, grid=grid, extra_files=files[1:],
                     command=command, report=report, settings=training_settings(args, captioned))
    return grid
