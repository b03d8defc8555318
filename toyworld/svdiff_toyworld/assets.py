"""Where the toy world's shipped files live, and small helpers that turn its tensors into pictures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"
SHIPPED_PIPELINE = DATA / "pipeline"  # the pretrained pipeline, committed once it has passed its gate
PIPELINE_ENV = "SVDIFF_TOOLS_TOYWORLD_PIPELINE"  # another folder in its place: a candidate before it ships


def pipeline_folder() -> Path:
    """Where the toy-world pipeline is looked for: ``$SVDIFF_TOOLS_TOYWORLD_PIPELINE`` when set (to try a freshly
    exported candidate with the trainer, the gate and the benchmarks before committing it), else the shipped one."""
    override = os.environ.get(PIPELINE_ENV)
    return Path(override) if override else SHIPPED_PIPELINE


def pipeline_path() -> Path:
    """The toy-world pipeline folder (a diffusers `StableDiffusionPipeline`); an error when there is none."""
    folder = pipeline_folder()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the toy-world pipeline is not at {folder}; pretrain it with "
                                "`python -m svdiff_toyworld.pretrain` (see docs/toyworld.md)")
    return folder


def to_pil(images: torch.Tensor) -> list:
    """(n, 3, h, w) in [-1, 1] -> PIL images."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def prompt_grid(images: torch.Tensor, prompts: Sequence[str], per_prompt: int, rows: int = 12,
                scale: int = 2) -> Image.Image:
    """One row per prompt (its text above, its `per_prompt` images below), the first `rows` prompts."""
    from svdiff_trainer.images import labelled_grid

    pil = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in to_pil(images)]
    grid_rows = [pil[i * per_prompt:(i + 1) * per_prompt] for i in range(min(rows, len(prompts)))]
    return labelled_grid(grid_rows, row_labels=list(prompts[:rows]))


def write_subject_images(subject, folder: Path, n: int = 5, seed: int = 0) -> list:
    """The subject's ``n`` training views (`Subject.views`) as PNG files in ``folder``, each with its caption
    (`Subject.caption`) in a ``.txt`` file of the same name."""
    from .render import render

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(subject.views(n, seed)):
        path = folder / f"{subject.name}_{i}.png"
        render(scene).save(path)
        path.with_suffix(".txt").write_text(subject.caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
