"""The trainer's one plug-in point: embedded base models ("presets") and the evaluators that measure a subject.

With no ``--pretrained_model_name_or_path`` the trainer trains on an embedded base. A preset is that base: where
its diffusers folder is, the flag defaults that suit it, the subject it ships (used when no data flags are given)
and, optionally, an `Evaluator` that measures a trained subject on it. The trainer ships one preset, "tiny"
(random weights, seconds on a CPU: the test suite's); other packages add theirs through the entry-point group
``svdiff_trainer.presets`` (name = "module:object"), as ``svdiff-toyworld`` does::

    [project.entry-points."svdiff_trainer.presets"]
    toyworld = "svdiff_toyworld.preset:PRESET"

The trainer imports no preset package: it reads the entry points, so a preset depends on the trainer and never the
other way round. Which preset: ``$SVDIFF_TOOLS_EMBEDDED`` names one; else the available one of highest
``priority``; "tiny" (priority 0) is always there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, List, Optional, Protocol, Sequence

from .recipe import Recipe

GROUP = "svdiff_trainer.presets"
EXAMPLE_DATA = Path(__file__).resolve().parent / "data" / "example_subject"  # five views of a toy, captioned
ENV = "SVDIFF_TOOLS_EMBEDDED"


class NotMeasurable(ValueError):
    """An evaluator cannot measure this subject; the message says why (one sentence)."""


class Evaluator(Protocol):
    """Measures how well a trained pipeline shows its subject (a metric network, a DINO/CLIP scorer, ...)."""

    report_file: str  # the JSON file written next to the adapter, e.g. "toyworld_report.json"
    title: str  # the model card's section heading

    def subject_for(self, data_dir: Path, instance_prompt: str, identifier: Optional[str] = None,
                    class_word: Optional[str] = None) -> object:
        """The subject this evaluator measures for that folder and prompt (identifier and class where known);
        raises `NotMeasurable` with the reason where it cannot."""

    def measure(self, pipe, load_base: Callable[[], object], subject: object, seeds: Sequence[int], steps: int,
                guidance: float, rendered: Dict[str, list]) -> dict:
        """The adapted ``pipe`` and the base (``load_base()``) on the evaluator's prompts, same seeds; ``rendered``:
        prompt -> images already made for ``seeds`` (measured instead of generated again)."""

    def report_lines(self, report: dict) -> List[str]:
        """Markdown lines of ``report`` for the model card and the log."""


@dataclass(frozen=True)
class Preset:
    """An embedded base model and what suits it.

    ``defaults(method)``: flag -> value for flags the user left unset (the user's flags win);
    ``subject(num_inference_steps, guidance_scale, resolution)``: the flags of the shipped subject, used when no
    data flags are given (instance folder and prompt, prior preservation, class images, validation prompts);
    ``load_lines``: Python lines that load the base, for the model card (runnable as written); ``recipe``: the
    DreamBooth recipe for any subject folder on this base (`recipe.Recipe`)."""

    name: str
    title: str
    pipeline_folder: Callable[[], Path]
    load_lines: List[str]
    defaults: Callable[[str], dict]
    subject: Callable[[int, float, int], dict]
    available: Callable[[], bool] = lambda: True
    evaluator: Optional[Evaluator] = None
    priority: int = 0
    recipe: Recipe = Recipe()


def _tiny() -> Preset:
    from .tiny import tiny_pipeline_path

    return Preset(
        name="tiny", title="the embedded tiny Stable Diffusion",
        pipeline_folder=lambda: tiny_pipeline_path("sd15"),
        load_lines=["from svdiff_trainer.tiny import tiny_pipeline_path",
                    'pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path("sd15"))'],
        defaults=lambda method: dict(resolution=32, max_train_steps=12, num_inference_steps=4),
        subject=lambda steps, guidance, resolution: dict(instance_data_dir=str(EXAMPLE_DATA),
                                                         instance_prompt="a photo of sks toy"),
        # random weights: class images of it would be noise, and the test suite's runs stay seconds long
        recipe=Recipe(prior_preservation=False, recontext=None, tuned_on="random weights: for tests"))


def installed() -> Dict[str, Preset]:
    """Every preset: the trainer's own "tiny" and those the entry points name (one that fails to load is left out
    with a warning, so a broken plug-in never stops a run on another base)."""
    import logging

    found = {"tiny": _tiny()}
    for ep in entry_points(group=GROUP):
        try:
            preset = ep.load()
        except Exception as exc:  # noqa: BLE001 (a third-party plug-in: any error is its own)
            logging.getLogger(__name__).warning("preset %s (%s) did not load: %s", ep.name, ep.value, exc)
            continue
        found[preset.name] = preset
    return found


def choose(name: Optional[str] = None) -> Preset:
    """The preset named by ``name`` or ``$SVDIFF_TOOLS_EMBEDDED``, else the available one of highest priority."""
    presets = installed()
    name = name or os.environ.get(ENV)
    if name:
        if name not in presets:
            raise ValueError(f"{ENV}={name!r} names no installed preset; installed: {', '.join(sorted(presets))}")
        return presets[name]
    return max((p for p in presets.values() if p.available()), key=lambda p: p.priority)
