"""Images the trainer makes: class images for prior preservation, validation images, the final check."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import torch

from svdiff_tools.atomic import remove_orphans, save_image, write_text
from .args import TrainingInputError, list_images
from .base_model import embedded_preset
from .config import RunConfig

logger = logging.getLogger(__name__)


CLASS_RECORD = ".class_images.json"


def class_images_made_by(cfg: RunConfig, base: str, prompt: str) -> dict:
    """What makes class images, as recorded beside them: the base model (a local folder as its absolute path, and
    its ``weights`` digest, so a moved or copied folder is still the same base), its revision and variant, the
    class prompt and the resolution."""
    local = Path(base).expanduser()
    return {"base": str(local.resolve()) if local.exists() else base, "weights": weights_digest(local),
            "revision": cfg.model.revision, "variant": cfg.model.variant, "prompt": prompt,
            "resolution": cfg.data.resolution}


def weights_digest(folder: Path) -> Optional[str]:
    """blake2b over a local model folder's files: each one's path inside the folder, its size and its first and last
    MiB (whole files are not read: a Stable Diffusion folder holds gigabytes); None where ``folder`` is not a
    folder (a hub id)."""
    if not folder.is_dir():
        return None
    digest = hashlib.blake2b(digest_size=12)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(2 ** 20))
            if size > 2 ** 21:
                f.seek(-2 ** 20, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()


def _same_base(recorded: dict, made_by: dict) -> bool:
    """The same weights where both records carry a digest; else the same path or id, except that a record from
    before the digests whose folder is gone (the package moved) is taken as it is, with one warning."""
    if recorded.get("weights") and made_by.get("weights"):
        return recorded["weights"] == made_by["weights"]
    if recorded.get("base") == made_by["base"]:
        return True
    gone = "weights" not in recorded and Path(str(recorded.get("base"))).is_absolute() \
        and not Path(str(recorded.get("base"))).exists()
    if gone:
        logger.warning("the class images' record names a base folder that no longer exists (%s) and predates weight "
                       "digests; they are used as images of this run's base %s", recorded.get("base"), made_by["base"])
    return gone


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
        differs = [k for k, value in made_by.items() if k not in ("base", "weights") and recorded.get(k) != value]
        if not _same_base(recorded, made_by):
            differs.insert(0, "base")
        for key in differs[:1]:
            if key == "base" and recorded.get("base") == made_by["base"]:
                key = "weights"  # the same folder, other files in it
            raise TrainingInputError(f"--class_data_dir {folder} holds class images made with another {key} "
                                     f"({recorded.get(key)!r}; this run: {made_by[key]!r}), which would train the "
                                     "prior on the wrong images; pass another --class_data_dir, or empty that folder "
                                     "to have them regenerated.")
    elif folder.is_dir() and (images := list_images(folder)):
        logger.warning("%d class images in %s carry no record of what made them (your own photos, or made by an "
                       "older svdiff-tools); prior preservation uses them as images of %r. Empty the folder to have "
                       "them regenerated with a record.", len(images), folder, made_by["prompt"])


def generate_class_images(cfg: RunConfig, load_pipeline, accelerator, weight_dtype, folder: Path, prompt: str,
                          made_by: dict) -> None:
    """Top up ``folder`` to --num_class_images images of ``prompt`` with the base model (never regenerates) and
    record ``made_by`` beside them (`check_class_images` reads it). Each image appears only when complete (an
    interrupted run leaves no truncated PNG for the next to count and read; runs sharing the folder write whole
    files)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder, older_than_s=3600)  # a killed run's temporary files, not a running one's
    _upgrade_record(folder / CLASS_RECORD, made_by)
    missing = cfg.data.num_class_images - len(list_images(folder))
    if missing <= 0:
        return
    if not (folder / CLASS_RECORD).is_file():
        write_text(folder / CLASS_RECORD, json.dumps({"made_by": made_by, "unrecorded_images": len(
            list_images(folder))}, indent=2, sort_keys=True))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.data.prior_generation_precision, weight_dtype)
    pipe = load_pipeline(torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    start = len(list_images(folder))
    with tqdm(total=missing, desc="generating class images", disable=not accelerator.is_local_main_process) as bar:
        done = 0
        while done < missing:
            n = min(cfg.data.sample_batch_size, missing - done)
            gen = torch.Generator().manual_seed((cfg.optim.seed or 0) + start + done)
            images = pipe([prompt] * n, num_inference_steps=cfg.validation.num_inference_steps,
                          guidance_scale=cfg.validation.guidance_scale, height=cfg.data.resolution,
                          width=cfg.data.resolution, generator=gen).images
            for i, img in enumerate(images):
                save_image(img, folder / f"class_{start + done + i:05d}.png")
            done += n
            bar.update(n)
    del pipe


def _upgrade_record(record: Path, made_by: dict) -> None:
    """A record from before weight digests, accepted by `check_class_images`, is rewritten with this run's (so its
    warning is given once)."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and isinstance(data.get("made_by"), dict) and "weights" not in data["made_by"]:
        write_text(record, json.dumps(dict(data, made_by=made_by), indent=2, sort_keys=True))


def validation_seed(cfg: RunConfig) -> int:
    return cfg.validation.validation_seed if cfg.validation.validation_seed is not None else (cfg.optim.seed or 0)


def validation_image_name(step: int, prompt_index: int, image_index: int) -> str:
    """``step{N}_{i}.png`` for the first validation prompt, ``step{N}_p{k}_{i}.png`` for prompt k."""
    prompt = f"_p{prompt_index}" if prompt_index else ""
    return f"step{step:06d}{prompt}_{image_index}.png"


def render_prompt(pipe, prompt: str, seeds, steps: int, guidance: float, resolution: Optional[int] = None,
                  batch: int = 4) -> list:
    """PIL images of ``prompt``, image i from a generator seeded ``seeds[i]`` (so batching does not change an
    image), ``batch`` per pipeline call."""
    pipe.set_progress_bar_config(disable=True)
    seeds, images = list(seeds), []
    size = dict(height=resolution, width=resolution) if resolution else {}
    for start in range(0, len(seeds), batch):
        part = seeds[start:start + batch]
        images += pipe([prompt] * len(part), num_inference_steps=steps, guidance_scale=guidance,
                       generator=[torch.Generator().manual_seed(s) for s in part], **size).images
    return images


def render_validation(cfg: RunConfig, pipe, step: int, folder: Path, accelerator=None) -> list:
    """--num_validation_images per validation prompt with fixed seeds (image i has seed ``validation_seed + i`` for
    every prompt), --sample_batch_size images per pipeline call (one generator per image, so batching does not
    change an image); saved as ``step{N}_{i}.png`` (first prompt) and ``step{N}_p{k}_{i}.png``. Returns one list of
    PIL images per prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    v, size = cfg.validation, cfg.data.resolution
    rows, first, n, batch = [], validation_seed(cfg), v.num_validation_images, max(1, cfg.data.sample_batch_size)
    for k, prompt in enumerate(v.validation_prompts):
        images = render_prompt(pipe, prompt, range(first, first + n), v.num_inference_steps, v.guidance_scale, size,
                               batch)
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


def training_settings(cfg: RunConfig, captioned: Optional[int] = None) -> dict:
    """What the command line may not show (the toy world and the method fill defaults): the model card's lines.
    ``captioned``: how many instance images had a caption file (None: not known)."""
    lr = f"{cfg.optim.learning_rate:g} ({cfg.optim.lr_scheduler}" + (f", {cfg.optim.lr_warmup_steps} warmup steps)"
                                                           if cfg.optim.lr_warmup_steps else ")")
    settings = {"learning rate": lr}
    if cfg.method.rank is not None:
        share = " (share of each matrix's spectral energy)" if cfg.method.rank < 1 else ""
        settings["rank"] = f"{cfg.method.rank:g}{share}"
    settings["text encoder"] = "frozen" if not cfg.method.train_text_encoder else "adapted" + (
        f", learning rate {cfg.optim.text_encoder_lr:g}" if cfg.optim.text_encoder_lr else "")
    settings["batch size"] = cfg.optim.train_batch_size * cfg.optim.gradient_accumulation_steps
    if cfg.data.with_prior_preservation:
        settings["prior preservation"] = f"`{cfg.data.class_prompt}`, weight {cfg.data.prior_loss_weight:g}"
    files = f"{captioned} caption files, " if captioned else ""
    if cfg.data.caption_probability == 0.0:
        settings["captions"] = "not used (the instance prompt on every step)"
    elif captioned == 0:
        settings["captions"] = "none (no caption files: the instance prompt on every step)"
    elif cfg.data.caption_probability < 1.0:
        settings["captions"] = f"{files}used on {cfg.data.caption_probability:.0%} of steps (else the instance prompt)"
    elif captioned:
        settings["captions"] = f"{files}used on every step"
    return settings


def final_check_and_card(cfg: RunConfig, base: str, backend, files: list, output_dir: Path, trainable: int, steps: int,
                         load_pipeline, captioned: Optional[int] = None, subjects=()) -> Path:
    """Reload the saved adapter into a fresh base pipeline, render the final images, measure the subject (the
    embedded preset's evaluator, and DINO / CLIP where --dino_model / --clip_model name models), draw the training
    crops and the loss curve, write the model card."""
    import svdiff_tools.diffusers  # noqa: F401  (the loader methods)

    from .args import recipe_lines
    from .card import write_model_card
    from .images import labelled_grid

    pipe = load_pipeline()
    backend.load_into(pipe, files)
    rows = render_validation(cfg, pipe, steps, output_dir / "validation", None)
    grid = output_dir / "grid.png"
    prompts = cfg.validation.validation_prompts
    save_image(labelled_grid(rows, [f"{cfg.method.method}, step {steps}: {p}" for p in prompts]), grid)
    reports = measure_subject(cfg, pipe, load_pipeline, rows, output_dir)
    figures = []
    if subjects:
        save_image(training_crops(cfg, subjects), output_dir / "training_crops.png")
        figures.append(("the instance images as trained (crop and resolution)", output_dir / "training_crops.png"))
    curve = write_loss_curve(output_dir)
    if curve is not None:
        figures.append(("training loss", curve))
    command = "accelerate launch train_dreambooth.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_model_card(output_dir, base_model=base, preset=embedded_preset(cfg.model), method=cfg.method.method,
                     trainable=trainable, adapter_file=files[0], instance_prompt=cfg.data.instance_prompt,
                     validation_prompt=prompts[0], steps=steps, grid=grid, extra_files=files[1:],
                     command=command, reports=reports, settings=training_settings(cfg, captioned), figures=figures,
                     recipe=recipe_lines(cfg)[1:])
    return grid


LOSS_FILE = "loss.csv"


def record_loss(output_dir: Path, step: int, loss: float) -> None:
    """Append ``step,loss`` to the run's loss record (a resumed run appends again from its checkpoint's step: the
    last value per step counts)."""
    with open(Path(output_dir) / LOSS_FILE, "a", encoding="utf-8") as f:
        f.write(f"{step},{loss:.6g}\n")


def write_loss_curve(output_dir: Path) -> Optional[Path]:
    """``loss.png`` from the run's loss record (None where there is none)."""
    from .images import loss_curve

    record = Path(output_dir) / LOSS_FILE
    if not record.is_file():
        return None
    by_step = {}
    for line in record.read_text(encoding="utf-8").splitlines():
        step, _, value = line.partition(",")
        try:
            by_step[int(step)] = float(value)
        except ValueError:
            continue  # a line cut short by a killed run
    steps = sorted(by_step)
    return save_image(loss_curve(steps, [by_step[s] for s in steps]), Path(output_dir) / "loss.png")


def training_crops(cfg: RunConfig, subjects, per_row: int = 10, scale_to: int = 96):
    """The instance images as the model sees them at the first epoch (resized, cropped as --center_crop says),
    ``per_row`` to a row, one row group per subject, each shown at ``scale_to`` pixels."""
    from PIL import Image

    from .data import crop_image
    from .images import labelled_grid

    rows, labels = [], []
    for sub in subjects:
        crops = [crop_image(img, cfg.data.resolution, cfg.data.center_crop, False, torch.Generator().manual_seed(i))
                 .resize((scale_to, scale_to), Image.NEAREST) for i, img in enumerate(sub.images[:5 * per_row])]
        for start in range(0, len(crops), per_row):
            rows.append(crops[start:start + per_row])
            labels.append(sub.prompt if start == 0 else "")
    return labelled_grid(rows, labels)


def measure_subject(cfg: RunConfig, pipe, load_pipeline, rows, output_dir: Path) -> list:
    """Every evaluator that applies on the final images (the ones just saved are the ones measured): the embedded
    preset's, and the photo metrics where --dino_model / --clip_model name models. Each report is written to
    ``output_dir`` and logged; returns (report, evaluator) pairs. An evaluator that cannot measure this folder and
    prompt is left out, the log says why."""
    from .presets import NotMeasurable

    log = logging.getLogger("train_dreambooth")
    evaluators = []
    preset = embedded_preset(cfg.model)
    if preset is not None and preset.evaluator is not None:
        evaluators.append(preset.evaluator)
    v, data = cfg.validation, cfg.data
    if v.dino_model or v.clip_model:
        from .photo_metrics import PhotoEvaluator

        evaluators.append(PhotoEvaluator(v.dino_model, v.clip_model, v.validation_prompts,
                                         resolution=data.resolution))
    if not evaluators:
        log.info("no subject report: this base has no evaluator; --dino_model and --clip_model (e.g. "
                 "facebook/dino-vits16, openai/clip-vit-base-patch32) add DINO / CLIP-I / CLIP-T to the card")
    first, out = validation_seed(cfg), []
    for evaluator in evaluators:
        try:
            subject = evaluator.subject_for(Path(data.instance_data_dir), data.instance_prompt, data.identifier,
                                            data.class_word)
        except NotMeasurable as exc:
            log.warning("no subject report (%s): %s", evaluator.title, exc)
            continue
        report = evaluator.measure(pipe, load_pipeline, subject, seeds=range(first, first + v.num_validation_images),
                                   steps=v.num_inference_steps, guidance=v.guidance_scale,
                                   rendered=dict(zip(v.validation_prompts, rows)))
        if output_dir is not None:
            write_text(Path(output_dir) / evaluator.report_file, json.dumps(report, indent=2))
        for line in evaluator.report_lines(report):
            log.info("%s", line)
        out.append((report, evaluator))
    return out
