"""A horizontal bar chart of step time per configuration, drawn with Pillow (no plotting dependency).

Bars are the median step times; a dashed line marks the frozen floor and a dotted one PEFT LoRA r4, so a
bar that ends left of the dotted line beats LoRA and its length past the dashed line is the adapter's cost.
"""

from __future__ import annotations

from typing import Dict, Optional

from PIL import Image, ImageDraw, ImageFont

FLOOR = "frozen floor"
LORA = "PEFT LoRA r4"


def _dashed(draw: ImageDraw.ImageDraw, x: int, top: int, bottom: int, color, dash: int) -> None:
    for y in range(top, bottom, 2 * dash):
        draw.line([(x, y), (x, min(y + dash, bottom))], fill=color, width=2)


def step_time_chart(results: Dict[str, float], title: str, path: str, lora: Optional[str] = LORA) -> None:
    """Write ``results`` ({label: ms}, in table order, the floor included) as a PNG at ``path``."""
    font = ImageFont.load_default()
    labels = list(results)
    bar_h, gap, left, right, top = 18, 6, 170, 90, 40
    width = 820
    height = top + len(labels) * (bar_h + gap) + 40
    scale = (width - left - right) / max(results.values())
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black", font=font)
    floor = results.get(FLOOR)
    for i, label in enumerate(labels):
        y = top + i * (bar_h + gap)
        ms = results[label]
        if label == FLOOR:
            color = (90, 90, 90)
        elif label == lora:
            color = (200, 120, 40)
        elif label in ("full fine-tuning", "naive svdiff"):
            color = (170, 170, 170)
        else:
            color = (50, 110, 190)
        draw.text((10, y + 3), label, fill="black", font=font)
        draw.rectangle([left, y, left + max(1, int(ms * scale)), y + bar_h], fill=color)
        ratio = f" ({ms / floor:.2f}x)" if floor else ""
        draw.text((left + int(ms * scale) + 5, y + 3), f"{ms:.1f} ms{ratio}", fill="black", font=font)
    bottom = top + len(labels) * (bar_h + gap)
    if floor:
        _dashed(draw, left + int(floor * scale), top - 5, bottom, (0, 0, 0), 6)
    if lora and lora in results:
        _dashed(draw, left + int(results[lora] * scale), top - 5, bottom, (200, 120, 40), 2)
    draw.text((10, bottom + 12), "dashed: frozen floor   dotted: PEFT LoRA r4   blue: svdiff-tools methods",
              fill="black", font=font)
    img.save(path)
