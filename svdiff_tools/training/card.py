"""The model card (README.md) written next to a trained adapter."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional


def write_model_card(output_dir: Path, *, base_model: str, method: str, trainable: int, adapter_file: Path,
                     instance_prompt: str, validation_prompt: str, steps: int, grid: Optional[Path],
                     extra_files: List[Path], command: str) -> Path:
    size_kib = adapter_file.stat().st_size / 1024
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: svdiff-tools",
        "tags: [text-to-image, dreambooth, svd-adapter, " + method + "]",
        "---",
        "",
        f"# DreamBooth {method} adapter",
        "",
        f"- base model: `{base_model}`",
        f"- method: `{method}`",
        f"- trainable parameters: {trainable:,}",
        f"- adapter file: `{adapter_file.name}` ({size_kib:.1f} KiB)",
        f"- instance prompt: `{instance_prompt}`",
        f"- validation prompt: `{validation_prompt}`",
        f"- training steps: {steps}",
    ]
    lines += [f"- also: `{p.name}`" for p in extra_files]
    if grid is not None:
        lines += ["", f"![validation images]({grid.name})"]
    lines += ["", "## Use", "", "```python", "import svdiff_tools  # adds load_svd_adapter to diffusers pipelines",
              "from diffusers import DiffusionPipeline", f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
              f'pipe.load_svd_adapter("{adapter_file.name}")', f'image = pipe("{validation_prompt}").images[0]', "```",
              "", "## Training command", "", "```bash", command, "```", ""]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
