"""The trainer's embedded default: DreamBooth on the shipped toy-world pipeline and subject, offline.

With no model or data flags, ``accelerate launch train_dreambooth.py --method M`` fine-tunes the pretrained
toy-world pipeline on the shipped example subject (``a photo of sks toy``) with prior preservation (class
images made by the base pipeline and cached), validates on the instance prompt and a recontextualisation
prompt, and measures subject identification (`evaluate.dreambooth_report`) against the base pipeline.
`METHOD_DEFAULTS` holds each method's learning rate and steps for this world, with where they come from.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .assets import pipeline_folder
from .evaluate import recontext_prompt
from .world import SUBJECTS

SUBJECT = SUBJECTS["example_toy"]
RESOLUTION = 64
NUM_CLASS_IMAGES = 32
NUM_VALIDATION_IMAGES = 8
INFERENCE_STEPS = 25
GUIDANCE = 5.0
# The identifier is a word the text encoder learnt only as "names no attribute": adapting the UNet alone binds it
# weakly (svfit and svdiff at 1e-2: 12-25% identified after 600 steps, docs/toyworld.md); with the text encoder
# adapted too, svdiff reached 88%. `--no-train_text_encoder` turns it off.
TRAIN_TEXT_ENCODER = True
# method -> (learning rate, optimizer steps, source of both). Until the pipeline ships these are starting points
# (the sweep's grid centres) and unused: the trainer falls back to the tiny pipeline and its own defaults.
SWEEP = "toy-world sweep (benchmarks/toyworld_lr_sweep.py, docs/toyworld.md)"
METHOD_DEFAULTS = {
    "svdiff": (1e-2, 600, SWEEP),
    "svfit": (1e-2, 600, SWEEP),
    "svft": (1e-2, 600, SWEEP),
    "vectorfit": (1e-2, 600, SWEEP),
    "lora": (1e-3, 600, SWEEP),
    "pissa": (1e-3, 600, SWEEP),
    "full": (1e-5, 600, SWEEP),
}


def available() -> bool:
    """Whether the pretrained toy-world pipeline is shipped (else the trainer falls back to the tiny one)."""
    return (pipeline_folder() / "model_index.json").is_file()


def class_data_dir() -> Path:
    """Class images of the shipped pipeline, cached per pipeline version (its UNet weights' hash)."""
    weights = pipeline_folder() / "unet" / "diffusion_pytorch_model.safetensors"
    tag = hashlib.blake2b(weights.read_bytes(), digest_size=6).hexdigest() if weights.is_file() else "none"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svdiff-tools" / "toyworld"
    return root / f"class-images-{tag}" / SUBJECT.class_word


def validation_prompts():
    return [SUBJECT.instance_prompt, recontext_prompt(SUBJECT)]
