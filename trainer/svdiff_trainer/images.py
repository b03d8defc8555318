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
