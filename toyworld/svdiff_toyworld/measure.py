"""Measure trained adapters again on the toy world, on other seeds and more images than the trainer's validation:

    python -m svdiff_toyworld.measure OUTPUT_DIR [OUTPUT_DIR ...] --first_seed 100 --num_images 32

for svd adapters of a named toy-world subject (shipped or held out). For any output (LoRA files, PEFT folders) and
any subject folder: ``python -m svdiff_trainer.evaluate`` (the same measure, the subject read from its images).
"""

from __future__ import annotations

from typing import List, Optional

from . import metric, preset
from .assets import pipeline_path
from .evaluate import dreambooth_report, report_lines
from .world import ALL_SUBJECTS


def main(argv: Optional[List[str]] = None) -> None:
    """Read a trained svd adapter again on other seeds (more images than the trainer's validation):

        python -m svdiff_toyworld.measure OUTPUT_DIR [OUTPUT_DIR ...] --first_seed 100 --num_images 32
    """
    import argparse

    from diffusers import StableDiffusionPipeline

    import svdiff_tools.diffusers  # noqa: F401  (load_svd_adapter)


    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="+", help="trainer output folders (or adapter files) of one shipped subject")
    p.add_argument("--subject", default=preset.SUBJECT.name, choices=sorted(ALL_SUBJECTS),
                   help="the toy-world subject they were trained on")
    p.add_argument("--first_seed", type=int, default=100)
    p.add_argument("--num_images", type=int, default=32, help="per prompt")
    p.add_argument("--num_inference_steps", type=int, default=preset.INFERENCE_STEPS)
    p.add_argument("--guidance_scale", type=float, default=preset.GUIDANCE)
    args = p.parse_args(argv)

    def load_base():
        return StableDiffusionPipeline.from_pretrained(pipeline_path(), safety_checker=None,
                                                       requires_safety_checker=False)

    net = metric.load()
    for adapter in args.adapters:
        pipe = load_base()
        pipe.load_svd_adapter(adapter)
        report = dreambooth_report(pipe, load_base, ALL_SUBJECTS[args.subject], net=net,
                                   seeds=range(args.first_seed, args.first_seed + args.num_images),
                                   steps=args.num_inference_steps, guidance=args.guidance_scale,
                                   base_cache=preset.base_report_cache())
        print(f"## {adapter}: seeds {args.first_seed}-{args.first_seed + args.num_images - 1}")
        print("\n".join(report_lines(report)), flush=True)


if __name__ == "__main__":
    main()
