"""One evaluator for any trained output and any subject folder:

    python -m svdiff_trainer.evaluate OUTPUT [OUTPUT ...]                 # trainer output folders: all from run.json
    python -m svdiff_trainer.evaluate lora.safetensors --instance_data_dir ./my_toy --instance_prompt "a photo of zwx toy"
    python -m svdiff_trainer.evaluate peft_folder/ --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" --dino_model facebook/dino-vits16 \\
        --clip_model openai/clip-vit-base-patch32

OUTPUT is anything `outputs.load_output` reads: an svd adapter file, a LoRA file (diffusers, kohya), a trainer output
folder, a PEFT folder. The base, subject folder and prompt come from a trainer output's ``run.json`` unless given.
The subject is measured by the embedded base's evaluator (the toy world's metric network reads any toy-world folder)
and, where DINO / CLIP models are named, by the photo metrics; adapted and base pipeline on the same prompts and
seeds. Anything it cannot score gets one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


class CannotEvaluate(ValueError):
    pass


def _recorded(output: Path) -> dict:
    """The trainer's record of a run (its flags, defaults filled) when ``output`` is (in) a trainer output folder."""
    folder = output if output.is_dir() else output.parent
    try:
        return json.loads((folder / "run.json").read_text(encoding="utf-8")).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _run_config(args, output: Path):
    """A `RunConfig` for evaluating ``output``: the run's record, then the flags given here."""
    from .args import fill_defaults
    from .config import RunConfig

    recorded = _recorded(output)
    flags = {k: recorded.get(k) for k in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt",
                                          "identifier", "class_word", "revision", "variant", "resolution")
             if recorded.get(k)}
    if recorded.get("embedded_model"):
        flags.pop("pretrained_model_name_or_path", None)
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "identifier",
                 "class_word", "resolution", "num_inference_steps", "guidance_scale", "dino_model", "clip_model"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    if "instance_data_dir" not in flags or "instance_prompt" not in flags:
        raise CannotEvaluate(f"{output} carries no record of its subject; pass --instance_data_dir and "
                             "--instance_prompt.")
    cfg = RunConfig.from_flags(flags)
    cfg.validation.num_validation_images = args.num_images
    cfg.validation.validation_seed = args.first_seed
    if args.prompts:
        cfg.validation.validation_prompts = args.prompts
    fill_defaults(cfg)
    if not Path(cfg.data.instance_data_dir).is_dir():
        raise CannotEvaluate(f"--instance_data_dir {cfg.data.instance_data_dir} does not exist; point it at the "
                             "subject's images.")
    return cfg


def evaluate(args, output: Path) -> List[str]:
    """Markdown lines: every applicable evaluator's report of ``output``."""
    from .base_model import load_pipeline, pipeline_class_name, resolve_base
    from .outputs import OutputNotLoadable, load_output
    from .validation import measure_subject, render_prompt

    cfg = _run_config(args, output)
    base = resolve_base(cfg.model)
    cls = pipeline_class_name(cfg.model, base)

    def load_base():
        return load_pipeline(cfg.model, base, cls)

    pipe = load_base()
    try:
        kind = load_output(pipe, output)
    except OutputNotLoadable as exc:
        raise CannotEvaluate(str(exc)) from None
    v = cfg.validation
    seeds = range(v.validation_seed, v.validation_seed + v.num_validation_images)
    rows = [render_prompt(pipe, p, seeds, v.num_inference_steps, v.guidance_scale, cfg.data.resolution)
            for p in v.validation_prompts]
    out_dir = Path(args.report_dir) if args.report_dir else None
    reports = measure_subject(cfg, pipe, load_base, rows, out_dir)
    if not reports:
        raise CannotEvaluate(f"nothing can score {output} on this base: name --dino_model and/or --clip_model for "
                             "photos (e.g. facebook/dino-vits16, openai/clip-vit-base-patch32).")
    lines = [f"## {output} ({kind}; seeds {seeds.start}-{seeds.stop - 1})"]
    for report, evaluator in reports:
        lines += ["", f"### {evaluator.title}", ""] + evaluator.report_lines(report)
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outputs", nargs="+", type=Path, help="adapter / LoRA files, trainer output or PEFT folders")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="default: the run's, else the embedded base")
    p.add_argument("--instance_data_dir", default=None, help="the subject's images; default: the run's")
    p.add_argument("--instance_prompt", default=None, help="default: the run's")
    p.add_argument("--identifier", default=None)
    p.add_argument("--class_word", default=None)
    p.add_argument("--prompts", nargs="+", default=None,
                   help="default: the recipe's validation prompts (instance and recontextualisation)")
    p.add_argument("--first_seed", type=int, default=100, help="other seeds than the trainer's validation (0-15)")
    p.add_argument("--num_images", type=int, default=32, help="per prompt")
    p.add_argument("--resolution", type=int, default=None, help="default: the run's, else the base's")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--dino_model", default=None, help="e.g. facebook/dino-vits16 (a hub id or a local folder)")
    p.add_argument("--clip_model", default=None, help="e.g. openai/clip-vit-base-patch32")
    p.add_argument("--report_dir", default=None, help="also write each report's JSON file here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    for output in args.outputs:
        try:
            print("\n".join(evaluate(args, output)), flush=True)
        except ValueError as exc:  # CannotEvaluate, TrainingInputError, NotMeasurable and a loader's own sentence
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
