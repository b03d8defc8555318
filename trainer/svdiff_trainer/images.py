"""Labelled image grids (generation comparisons and the trainer's validation grid)."""

from __future__ import annotations

from typing import Optional, Sequence

from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Optional[Sequence[str]] = None,
                  caption: Optional[str] = None) -> Image.Image:
    """Rows of equally sized images pasted into one image; each row gets its label above it."""
    rows = [list(r) for r in rows if len(r)]
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    label_h = LABEL_HEIGHT if row_labels else 0
    top = LABEL_HEIGHT if caption else 0
    grid = Image.new("RGB", (cols * w, top + len(rows) * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    if caption:
        draw.text((2, 1), caption[:200], fill="black")
    for i, row in enumerate(rows):
        y = top + i * (h + label_h)
        if row_labels:
            draw.text((2, y + 1), str(row_labels[i]), fill="black")
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((w, h)), (j * w, y + label_h))
    return grid


def loss_curve(steps: Sequence[int], losses: Sequence[float], size=(480, 200), window: int = 25) -> Image.Image:
    """The training loss against the step: each step's loss in grey, its running mean over ``window`` steps in
    blue, the axes labelled with the first and last step and the loss range."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    if not losses:
        draw.text((4, 4), "no steps", fill="black")
        return img
    left, right, top, bottom = 48, w - 8, 16, h - 18
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-8
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, value):
        return (left + (right - left) * (step - first) / (last - first),
                bottom - (bottom - top) * (value - lo) / (hi - lo))

    mean, acc = [], 0.0
    for i, value in enumerate(losses):
        acc += value - (losses[i - window] if i >= window else 0.0)
        mean.append(acc / min(i + 1, window))
    if len(losses) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(190, 190, 190))
        draw.line([xy(s, v) for s, v in zip(steps, mean)], fill=(30, 80, 200), width=2)
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((2, top - 2), f"{hi:.3g}", fill="black")
    draw.text((2, bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((left, bottom + 3), f"step {first}", fill="black")
    draw.text((right - 60, bottom + 3), f"step {steps[-1]}", fill="black")
    draw.text((left + 4, 2), f"training loss (grey) and its mean over {window} steps (blue)", fill="black")
    return img
