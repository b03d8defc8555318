"""The model card (README.md) written next to a trained adapter."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..atomic import write_text

EMBEDDED_NAMES = {"toyworld": "the embedded toy-world Stable Diffusion", "tiny": "the embedded tiny Stable Diffusion"}
EMBEDDED_LOAD = {
    "toyworld": ["from svdiff_tools.toyworld.assets import pipeline_path",
                 "pipe = DiffusionPipeline.from_pretrained(pipeline_path())"],
    "tiny": ["from svdiff_tools.training.tiny import tiny_pipeline_path",
             'pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path("sd15"))'],
}


def write_model_card(output_dir: Path, *, base_model: str, method: str, trainable: int, adapter_file: Path,
                     instance_prompt: str, validation_prompt: str, steps: int, grid: Optional[Path],
                     extra_files: List[Path], command: str, embedded: Optional[str] = None,
                     report: Optional[dict] = None, settings: Optional[dict] = None) -> Path:
    """``embedded``: "toyworld" / "tiny" when the trainer used an embedded base (its load lines are runnable
    as written); ``report``: the toy world's subject measurements (`toyworld.evaluate.dreambooth_report`);
    ``settings``: the training settings in effect, defaults included (name -> value), one line each."""
    files = [p for p in adapter_file.rglob("*") if p.is_file()] if adapter_file.is_dir() else [adapter_file]
    size_kib = sum(p.stat().st_size for p in files) / 1024
    shown = EMBEDDED_NAMES.get(embedded, base_model)
    lines = [
        "---",
        f"base_model: {base_model if embedded is None else 'svdiff-tools/' + embedded}",
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
    if report is not None:
        from ..toyworld.evaluate import report_lines

        lines += ["", "## Subject measured on the toy world", "",
                  "Same prompts and seeds for the adapted and the base pipeline; identification by the toy world's "
                  "metric network (nearest neighbour among renders of the subject and of other toys).", ""]
        lines += report_lines(report)
    load = EMBEDDED_LOAD.get(embedded, [f'pipe = DiffusionPipeline.from_pretrained("{base_model}")'])
    lines += ["", "## Use", "", "```python", "import svdiff_tools.diffusers  # adds load_svd_adapter to diffusers pipelines",
              "from diffusers import DiffusionPipeline", *load,
              *([f'pipe.unet = type(pipe.unet).from_pretrained("{adapter_file}")'] if method == "full" else
                [f'pipe.load_svd_adapter("{adapter_file}")']),
              f'image = pipe("{validation_prompt}").images[0]', "```",
              "", "## Training command", "", "```bash", command, "```", ""]
    return write_text(output_dir / "README.md", "\n".join(lines))
