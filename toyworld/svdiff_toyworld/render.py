"""Drawing toy-world scenes with PIL: each scene is drawn at 4x and box-filtered down (anti-aliased).

Geometry is in units of the canvas (0..1); a body of radius `r` is centred at its position; every class
keeps its decorations within 1.5 r of the centre, so positions are chosen to keep objects on the canvas.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .world import Scene, ToyObject

RGB = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 210, 30), "green": (40, 160, 60),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "pink": (245, 130, 190), "brown": (130, 80, 40),
}
BACKGROUND_RGB = {
    "white": (245, 245, 245), "black": (25, 25, 30), "blue": (150, 200, 245), "green": (170, 225, 150),
    "yellow": (250, 235, 170), "grey": (140, 140, 145),
}
TRIM_RGB = {"white": (255, 255, 255), "black": (20, 20, 20), "gold": (255, 190, 0), "cyan": (0, 220, 230),
            "red": (255, 40, 40), "lime": (150, 255, 60), "grey": (120, 120, 120)}
# Bumped whenever a scene's pixels change, so caches of encoded scenes (pretrain's latent table) are rebuilt.
RENDER_VERSION = 2
RADIUS = {"small": 0.16, "big": 0.24}
STRIPES = (0.8, 0.4)         # period and stripe width, in body radii
DOTS = (0.65, 0.2, 0.7)      # hexagonal grid period, dot radius, reach of the dot centres, in body radii
EXTENT = 1.45          # decorations stay within EXTENT * r of the centre
SUPERSAMPLE = 4


def centre(obj: ToyObject) -> Tuple[float, float, float]:
    """(x, y, r) in canvas units, jitter applied."""
    r = RADIUS[obj.size] * (1 + obj.jitter[2])
    margin = EXTENT * RADIUS[obj.size] * 1.08 + 0.02
    off = 0.5 - margin
    dx, dy = {"center": (0, 0), "left": (-off, 0), "right": (off, 0), "top": (0, -off), "bottom": (0, off)}[obj.position]
    return 0.5 + dx + obj.jitter[0], 0.5 + dy + obj.jitter[1], r


def shape_polygon(shape: str, x: float, y: float, r: float) -> List[Tuple[float, float]]:
    def ring(n, rot=-math.pi / 2, rr=None):
        rr = rr or [r] * n
        return [(x + rr[i] * math.cos(rot + 2 * math.pi * i / n), y + rr[i] * math.sin(rot + 2 * math.pi * i / n))
                for i in range(n)]

    if shape == "circle":
        return ring(48)
    if shape == "square":
        s = r * 0.86
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.98, y + r * 0.75), (x - r * 0.98, y + r * 0.75)]
    if shape == "star":
        return ring(10, rr=[r if i % 2 == 0 else r * 0.48 for i in range(10)])
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)]
    if shape == "hexagon":
        return ring(6, rot=0)
    if shape == "cross":
        a, b = r * 0.95, r * 0.36
        return [(x - b, y - a), (x + b, y - a), (x + b, y - b), (x + a, y - b), (x + a, y + b), (x + b, y + b),
                (x + b, y + a), (x - b, y + a), (x - b, y + b), (x - a, y + b), (x - a, y - b), (x - b, y - b)]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            hx = 16 * math.sin(t) ** 3
            hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x + r * hx / 16.5, y - r * (hy + 2.5) / 15.5))
        return pts
    raise ValueError(shape)


def pattern_rgb(rgb):
    """The pattern's colour on a body of colour ``rgb``: a light tint on dark bodies, a dark shade on light ones."""
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    if luminance < 0.5:
        return tuple(int(c + (255 - c) * 0.6) for c in rgb)
    return tuple(int(c * 0.45) for c in rgb)


class _Canvas:
    def __init__(self, size: int, background: str):
        self.n = size * SUPERSAMPLE
        self.image = Image.new("RGB", (self.n, self.n), BACKGROUND_RGB[background])
        self.draw = ImageDraw.Draw(self.image)

    def px(self, pts):
        return [(px * self.n, py * self.n) for px, py in pts]

    def polygon(self, pts, fill):
        self.draw.polygon(self.px(pts), fill=fill)

    def ellipse(self, x, y, rx, ry, fill):
        self.draw.ellipse([(x - rx) * self.n, (y - ry) * self.n, (x + rx) * self.n, (y + ry) * self.n], fill=fill)

    def rect(self, x0, y0, x1, y1, fill):
        self.draw.rectangle([x0 * self.n, y0 * self.n, x1 * self.n, y1 * self.n], fill=fill)

    def line(self, pts, fill, width):
        self.draw.line(self.px(pts), fill=fill, width=max(1, int(width * self.n)))


def _body(c: _Canvas, obj: ToyObject, x, y, r):
    colour = RGB[obj.colour]
    poly = shape_polygon(obj.shape, x, y, r)
    c.polygon(poly, colour)
    if obj.pattern == "plain":
        return
    # pattern drawn on a mask of the body so it never leaves it
    mask = Image.new("L", (c.n, c.n), 0)
    ImageDraw.Draw(mask).polygon(c.px(poly), fill=255)
    layer = Image.new("RGB", (c.n, c.n), pattern_rgb(colour))
    pmask = Image.new("L", (c.n, c.n), 0)
    d = ImageDraw.Draw(pmask)
    if obj.pattern == "striped":
        step, w = r * STRIPES[0], r * STRIPES[1]
        k = -3
        while k <= 3:
            y0 = y + k * step
            d.rectangle([(x - 1.2 * r) * c.n, (y0 - w / 2) * c.n, (x + 1.2 * r) * c.n, (y0 + w / 2) * c.n], fill=255)
            k += 1
    else:  # dotted
        step, rad, reach = r * DOTS[0], r * DOTS[1], r * DOTS[2]
        for i in range(-3, 4):
            for j in range(-3, 4):
                cx, cy = x + (i + 0.5 * (j % 2)) * step, y + j * step * 0.866
                if math.hypot(cx - x, cy - y) > reach:
                    continue
                d.ellipse([(cx - rad) * c.n, (cy - rad) * c.n, (cx + rad) * c.n, (cy + rad) * c.n], fill=255)
    from PIL import ImageChops

    c.image.paste(layer, (0, 0), ImageChops.multiply(mask, pmask))


def _toy(c: _Canvas, obj: ToyObject, x, y, r):
    trim = TRIM_RGB[obj.trait("trim")]
    acc = obj.accessory
    if acc == "hat":
        c.polygon([(x - 0.45 * r, y - 0.8 * r), (x + 0.45 * r, y - 0.8 * r), (x + 0.3 * r, y - 1.4 * r),
                   (x - 0.3 * r, y - 1.4 * r)], trim)
        c.rect(x - 0.65 * r, y - 0.9 * r, x + 0.65 * r, y - 0.75 * r, trim)
    elif acc == "bow":
        c.polygon([(x, y - 0.95 * r), (x - 0.6 * r, y - 1.35 * r), (x - 0.6 * r, y - 0.6 * r)], trim)
        c.polygon([(x, y - 0.95 * r), (x + 0.6 * r, y - 1.35 * r), (x + 0.6 * r, y - 0.6 * r)], trim)
        c.ellipse(x, y - 0.95 * r, 0.15 * r, 0.15 * r, trim)
    elif acc == "antenna":
        c.line([(x, y - 0.7 * r), (x, y - 1.25 * r)], trim, 0.09 * r)
        c.ellipse(x, y - 1.3 * r, 0.18 * r, 0.18 * r, trim)
    _eyes(c, obj.trait("eyes"), x, y - 0.15 * r, r)
    if acc == "badge":
        c.ellipse(x + 0.35 * r, y + 0.4 * r, 0.22 * r, 0.22 * r, trim)


def _eyes(c: _Canvas, style, x, y, r):
    for sx in (-1, 1):
        ex = x + sx * 0.3 * r
        if style == "sleepy":
            c.rect(ex - 0.2 * r, y - 0.05 * r, ex + 0.2 * r, y + 0.07 * r, (15, 15, 15))
        else:
            er = 0.2 * r if style == "dots" else 0.3 * r
            c.ellipse(ex, y, er, er, (255, 255, 255))
            c.ellipse(ex, y + 0.03 * r, er * 0.5, er * 0.5, (15, 15, 15))


def _robot(c: _Canvas, obj: ToyObject, x, y, r):
    metal = (90, 90, 100)
    leg = 0.55 * r if obj.trait("legs") == "long" else 0.3 * r
    for sx in (-1, 1):
        c.rect(x + sx * 0.35 * r - 0.1 * r, y + 0.6 * r, x + sx * 0.35 * r + 0.1 * r, y + 0.8 * r + leg, metal)
        if obj.trait("arms") == "up":
            c.line([(x + sx * 0.8 * r, y), (x + sx * 1.3 * r, y - 0.6 * r)], metal, 0.12 * r)
        else:
            c.line([(x + sx * 0.8 * r, y), (x + sx * 1.3 * r, y + 0.6 * r)], metal, 0.12 * r)
    return metal


def _robot_top(c: _Canvas, obj: ToyObject, x, y, r):
    c.rect(x - 0.6 * r, y - 0.35 * r, x + 0.6 * r, y - 0.02 * r, (30, 30, 35))
    glow = TRIM_RGB[obj.trait("visor")]
    for sx in (-1, 1):
        c.ellipse(x + sx * 0.3 * r, y - 0.18 * r, 0.11 * r, 0.11 * r, glow)


def _car(c: _Canvas, obj: ToyObject, x, y, r):
    wheel = TRIM_RGB[obj.trait("wheels")] if obj.trait("wheels") != "white" else (235, 235, 235)
    for sx in (-1, 1):
        c.ellipse(x + sx * 0.55 * r, y + 0.95 * r, 0.32 * r, 0.32 * r, (10, 10, 10))
        c.ellipse(x + sx * 0.55 * r, y + 0.95 * r, 0.18 * r, 0.18 * r, wheel)


def _car_top(c: _Canvas, obj: ToyObject, x, y, r):
    glass = (200, 235, 255)
    if obj.trait("window") == "round":
        c.ellipse(x, y - 0.2 * r, 0.35 * r, 0.3 * r, glass)
    else:
        c.rect(x - 0.4 * r, y - 0.45 * r, x + 0.4 * r, y + 0.05 * r, glass)
    if obj.trait("lights") == "yes":
        c.ellipse(x + 0.7 * r, y + 0.35 * r, 0.16 * r, 0.16 * r, (255, 240, 120))
        c.ellipse(x - 0.7 * r, y + 0.35 * r, 0.16 * r, 0.16 * r, (255, 240, 120))


def draw_object(c: _Canvas, obj: ToyObject) -> None:
    x, y, r = centre(obj)
    if obj.cls == "robot":
        _robot(c, obj, x, y, r)
    elif obj.cls == "car":
        _car(c, obj, x, y, r)
    _body(c, obj, x, y, r)
    if obj.cls == "toy":
        _toy(c, obj, x, y, r)
    elif obj.cls == "robot":
        _robot_top(c, obj, x, y, r)
    else:
        _car_top(c, obj, x, y, r)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size` x `size` RGB image."""
    c = _Canvas(size, scene.background)
    for obj in scene.objects:
        draw_object(c, obj)
    return c.image.resize((size, size), Image.BOX)


def render_batch(scenes: Sequence[Scene], size: int = 64) -> np.ndarray:
    """uint8 array (n, size, size, 3)."""
    return np.stack([np.asarray(render(s, size)) for s in scenes])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_tensor(scenes: Sequence[Scene], device=None) -> torch.Tensor:
    """Scenes as a float (n, 3, 64, 64) batch in [-1, 1]."""
    x = to_tensor(render_batch(scenes))
    return x.to(device) if device is not None else x
