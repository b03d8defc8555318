"""DreamBooth data: instance (and class) images as normalised tensors, in a resumable order.

Images are EXIF-rotated, converted to RGB (grayscale, palette and CMYK directly, RGBA composited on
white), resized so the shorter side equals the resolution, cropped (centre or random) and optionally
flipped, then scaled to [-1, 1]. Random crops and flips and the sample order depend only on
(seed, epoch, index), so a run resumed from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .args import IMAGE_SUFFIXES, TrainingInputError, list_images

logger = logging.getLogger(__name__)


def open_rgb(path: Path) -> Image.Image:
    """An image file as RGB, EXIF orientation applied, or a `TrainingInputError` naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")
    except Image.DecompressionBombError:
        raise TrainingInputError(f"image {path} declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (a "
                                 "decompression bomb or a huge scan); resize it or remove it.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise TrainingInputError(f"image {path} cannot be read ({type(exc).__name__}); remove or replace it.") from None


def load_folder(folder: Path) -> List[Image.Image]:
    """Every image of a folder; other files are skipped with a warning."""
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES)
    if others:
        logger.warning("skipping %d non-image files in %s: %s", len(others), folder, ", ".join(others[:5]))
    return [open_rgb(p) for p in list_images(folder)]


def to_tensor(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
              gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    if center_crop or gen is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=gen))
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and gen is not None and float(torch.rand(1, generator=gen)) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


class DreamBoothDataset(Dataset):
    """Item i: instance image i % n_instance (and class image i % n_class with prior preservation)."""

    def __init__(self, instance_images: Sequence[Image.Image], resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, class_images: Sequence[Image.Image] = ()):
        self.instance_images = list(instance_images)
        self.class_images = list(class_images)
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _tensor(self, img: Image.Image, index: int, salt: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, salt)) & 0x7FFFFFFF)
        return to_tensor(img, self.resolution, self.center_crop, self.random_flip, gen)

    def __getitem__(self, index: int) -> dict:
        item = {"instance": self._tensor(self.instance_images[index % len(self.instance_images)], index, 0),
                "index": index}
        if self.class_images:
            item["class"] = self._tensor(self.class_images[index % len(self.class_images)], index, 1)
        return item


def collate(items: List[dict]) -> dict:
    batch = {"pixel_values": torch.stack([it["instance"] for it in items]),
             "index": torch.tensor([it["index"] for it in items])}
    if "class" in items[0]:
        batch["class_pixel_values"] = torch.stack([it["class"] for it in items])
    return batch


class EpochSampler(Sampler):
    """This process's share of a permutation that depends only on (seed, epoch): rank r of n processes
    takes positions r, r + n, ... (padded by wrapping so every process gets as many). The trainer calls
    `set_epoch`; nothing else does (the loader is not handed to Accelerate, whose loader would set the
    epoch from its own iteration count, which differs after a resume)."""

    def __init__(self, size: int, seed: int, dataset: Optional[DreamBoothDataset] = None,
                 num_replicas: int = 1, rank: int = 0):
        self.size, self.seed, self.epoch, self.dataset = size, seed, 0, dataset
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=gen).tolist()
        perm += perm[: len(self) * self.num_replicas - self.size]
        return iter(perm[self.rank::self.num_replicas])
