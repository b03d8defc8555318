"""The model card (README.md) written next to a trained adapter."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from svdiff_tools.atomic import write_text


def write_model_card(output_dir: Path, *, base_model: str, method: str, trainable: int, adapter_file: Path,
                     instance_prompt: str, validation_prompt: str, steps: int, grid: Optional[Path],
                     extra_files: List[Path], command: str, preset=None,
                     reports: Sequence[Tuple[dict, object]] = (), settings: Optional[dict] = None,
                     figures: Sequence[Tuple[str, Path]] = (), recipe: Sequence[str] = ()) -> Path:
    """``preset``: the embedded base when the trainer used one (a `presets.Preset`: its title and load lines,
    runnable as written); ``reports``: (report, evaluator) pairs, the subject as each evaluator measured it;
    ``settings``: the training settings in effect, defaults included (name -> value), one line each; ``figures``:
    (caption, image file in ``output_dir``), e.g. the training crops and the loss curve; ``recipe``: the run's
    recipe lines (`args.recipe_lines`)."""
    embedded = preset
    files = [p for p in adapter_file.rglob("*") if p.is_file()] if adapter_file.is_dir() else [adapter_file]
    size_kib = sum(p.stat().st_size for p in files) / 1024
    shown = embedded.title if embedded is not None else base_model
    lines = [
        "---",
        f"base_model: {base_model if embedded is None else 'svdiff-tools/' + embedded.name}",
        "library_name: svdiff-tools",
        "tags: [text-to-image, dreambooth, svd-adapter, " + method + "]",
        "---",
        "",
        f"# DreamBooth {method} adapter",
        "",
        f"- base model: {shown} (`{base_model}`)",
        f"- method: `{method}`",
        f"- trainable parameters: {trainable:,}",
        f"- adapter file: `{adapter_file.name}` ({size_kib:.1f} KiB)",
        f"- instance prompt: `{instance_prompt}`",
        f"- validation prompt: `{validation_prompt}`",
        f"- training steps: {steps}",
    ]
    lines += [f"- {name}: {value}" for name, value in (settings or {}).items()]
    lines += [f"- also: `{p.name}`" for p in extra_files]
    if grid is not None:
        lines += ["", f"![validation images]({grid.name})"]
    for report, evaluator in reports:
        lines += ["", f"## {evaluator.title}", ""] + evaluator.report_lines(report)
    for caption, path in figures:
        lines += ["", f"![{caption}]({Path(path).name})", f"*{caption}*"]
    if recipe:
        lines += ["", "## Recipe", ""] + [f"- {line}" for line in recipe]
    load = embedded.load_lines if embedded is not None else [f'pipe = DiffusionPipeline.from_pretrained("{base_model}")']
    lines += ["", "## Use", "", "```python", "import svdiff_tools.diffusers  # adds load_svd_adapter to diffusers pipelines",
              "from diffusers import DiffusionPipeline", *load,
              *([f'pipe.unet = type(pipe.unet).from_pretrained("{adapter_file}")'] if method == "full" else
                [f'pipe.load_svd_adapter("{adapter_file}")']),
              f'image = pipe("{validation_prompt}").images[0]', "```",
              "", "## Training command", "", "```bash", command, "```", ""]
    return write_text(output_dir / "README.md", "\n".join(lines))
