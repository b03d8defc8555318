"""DreamBooth data: instance (and class) images as normalised tensors, in a resumable order.

Images are EXIF-rotated, converted to RGB (grayscale, palette and CMYK directly, RGBA composited on
white), resized so the shorter side equals the resolution, cropped (centre or random) and optionally
flipped, then scaled to [-1, 1]. Random crops and flips and the sample order depend only on
(seed, epoch, index), so a run resumed from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .args import IMAGE_SUFFIXES, TrainingInputError, list_images, mixed_prompt

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


def load_folder(folder: Path, caption_extension: Optional[str] = None) -> List[Image.Image]:
    """Every image of a folder; other files (but ``caption_extension`` ones) are skipped with a warning."""
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
                    and not p.name.startswith(".") and not (caption_extension and p.name.endswith(caption_extension)))
    if others:
        logger.warning("skipping %d non-image files in %s: %s", len(others), folder, ", ".join(others[:5]))
    return [open_rgb(p) for p in list_images(folder)]


def load_captions(folder: Path, caption_extension: Optional[str], default: str) -> List[str]:
    """Each image's prompt, in `list_images` order: the text of its caption file (``photo.png`` ->
    ``photo`` + ``caption_extension``, kohya's sidecar convention) where one exists, else ``default``."""
    prompts = []
    for image in list_images(folder):
        path = image.with_name(image.stem + caption_extension) if caption_extension else None
        if path is None or not path.is_file():
            prompts.append(default)
            continue
        try:
            text = " ".join(path.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainingInputError(f"caption file {path} cannot be read ({type(exc).__name__}); save it as UTF-8 "
                                     "text or delete it.") from None
        if not text:
            raise TrainingInputError(f"caption file {path} is empty; write the image's prompt in it (e.g. "
                                     f"'{default}') or delete it.")
        prompts.append(text)
    return prompts


def warn_captions_without(folder: Path, caption_extension: Optional[str], identifier: Optional[str]) -> None:
    """One warning naming the caption files whose text lacks ``identifier`` (e.g. a ``zwx`` caption in a ``sks``
    run): their images would teach the subject under other words."""
    if not identifier or not caption_extension:
        return
    odd = []
    for image in list_images(folder):
        path = image.with_name(image.stem + caption_extension)
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if identifier not in re.findall(r"[\w-]+", text.lower()):
                odd.append((path.name, " ".join(text.split())[:60]))
    if odd:
        logger.warning("%d caption file(s) in %s do not name the identifier %r (%s): their images train the subject "
                       "under other words; add %r to them or delete them.", len(odd), folder, identifier,
                       "; ".join(f"{n}: {t!r}" for n, t in odd[:3]) + (" ..." if len(odd) > 3 else ""), identifier)


def crop_image(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
               gen: Optional[torch.Generator] = None) -> Image.Image:
    """``img`` as trained: its shorter side resized to ``resolution``, a ``resolution`` square cropped (the centre,
    or with ``gen`` and not ``center_crop`` a random one) and, with ``random_flip``, mirrored at even odds."""
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
    return img


def to_tensor(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
              gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1] of `crop_image`."""
    img = crop_image(img, resolution, center_crop, random_flip, gen)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass
class SubjectData:
    """One subject of a (multi-subject) run: its images, identifier, class word and instance prompt; ``captions``
    (one per image, `load_captions`) replace the prompt image by image."""

    images: List[Image.Image]
    identifier: str
    class_word: str
    prompt: str
    captions: Optional[List[str]] = None

    def prompt_of(self, i: int) -> str:
        return self.captions[i] if self.captions else self.prompt


# A view's border is a flat backdrop when every border pixel lies within this many levels (per channel) of the
# border's median colour; its pixels farther than that from the backdrop are the subject.
FLAT_TOLERANCE = 12
# Foreground Cut-Mix: each subject's cut-out spans this share of the canvas (its longer side), centred in its half,
# the size of a small object as the toy world draws two of them left and right (the shipped subjects' small views:
# 22-28 of 64 pixels).
CUTMIX_OBJECT_SIZE = 0.38


def subject_cut_out(img: Image.Image) -> Optional[Tuple[Tuple[int, int, int], Image.Image]]:
    """``(backdrop colour, subject)`` of a view on a flat backdrop, else None. The backdrop is flat when every
    pixel of the one-pixel border is within FLAT_TOLERANCE of the border's median colour; the subject is an RGBA
    crop of its bounding box, alpha 255 where a pixel differs from the backdrop by more than FLAT_TOLERANCE in
    some channel, else 0 (None when nothing differs)."""
    rgb = img.convert("RGB")
    a = np.asarray(rgb).astype(np.int16)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    backdrop = np.median(border, axis=0)
    if np.abs(border - backdrop).max() > FLAT_TOLERANCE:
        return None
    mask = np.abs(a - backdrop).max(axis=-1) > FLAT_TOLERANCE
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    subject = rgb.crop(box)
    subject.putalpha(Image.fromarray((mask * 255).astype(np.uint8)).crop(box))
    return tuple(int(c) for c in backdrop), subject


def cutmix(left: Image.Image, right: Image.Image, resolution: int, cut_outs: Optional[Sequence] = None
           ) -> Image.Image:
    """Cut-Mix (SVDiff): two subjects in one ``resolution`` square, ``left``'s on the left half.

    Views on a flat backdrop (a product-photo or toy-world view; `subject_cut_out`, or ``cut_outs`` already made
    for ``(left, right)``) are composed as one scene: each subject scaled so its longer side is
    CUTMIX_OBJECT_SIZE of the canvas and centred in its half, on the left view's backdrop. Other views are put
    side by side (`cutmix_halves`), as the paper does."""
    cut_outs = cut_outs if cut_outs is not None else [subject_cut_out(v) for v in (left, right)]
    if any(c is None for c in cut_outs):
        return cutmix_halves(left, right, resolution)
    canvas = Image.new("RGB", (resolution, resolution), cut_outs[0][0])
    for (_, subject), cx in zip(cut_outs, (0.25, 0.75)):
        scale = CUTMIX_OBJECT_SIZE * resolution / max(subject.size)
        w, h = max(1, round(subject.width * scale)), max(1, round(subject.height * scale))
        small = subject.resize((w, h), Image.BILINEAR)
        canvas.paste(small, (round(cx * resolution - w / 2), round((resolution - h) / 2)), small)
    return canvas


def cutmix_halves(left: Image.Image, right: Image.Image, resolution: int) -> Image.Image:
    """Two subjects' views side by side, ``resolution`` square. Each view (its centre square) is scaled whole into a
    ``resolution / 2`` square, so a subject off centre or small is kept rather than cut away, and stands in its
    half's middle; the rows above and below repeat the view's top and bottom edge."""
    half = resolution // 2
    canvas = Image.new("RGB", (resolution, resolution))
    for img, x in ((left, 0), (right, half)):
        w, h = img.size
        side = min(w, h)
        square = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        small = np.asarray(square.resize((half, half), Image.BILINEAR))
        top = (resolution - half) // 2
        column = np.pad(small, ((top, resolution - half - top), (0, 0), (0, 0)), mode="edge")
        canvas.paste(Image.fromarray(column), (x, 0))
    return canvas


class DreamBoothDataset(Dataset):
    """Item i: instance image i % n_instance with its prompt (its caption at ``caption_probability``, drawn per
    item, else its subject's prompt; and class image i % n_class with its
    prompt, with prior preservation). With several subjects and ``cutmix_probability`` > 0, an item is instead,
    at that rate, a Cut-Mix of its image and an image of another subject (sides and partner drawn per item),
    prompted ``a photo of <id1> <class1> on the left and <id2> <class2> on the right`` and never flipped; its
    ``mix`` says which identifier is where (the unmix regularisation reads it)."""

    def __init__(self, instance_images: Sequence[Image.Image], resolution: int, center_crop: bool,
                 random_flip: bool, seed: int, class_images: Sequence[Image.Image] = (),
                 instance_prompt: str = "", class_prompt: str = "", subjects: Sequence[SubjectData] = (),
                 class_prompts: Sequence[str] = (), cutmix_probability: float = 0.0,
                 caption_probability: float = 1.0):
        self.subjects = list(subjects) or [SubjectData(list(instance_images), "", "", instance_prompt)]
        self.instances = [(img, k, sub.prompt_of(i)) for k, sub in enumerate(self.subjects)
                          for i, img in enumerate(sub.images)]
        self.instance_images = [img for img, _, _ in self.instances]
        self.class_images = list(class_images)
        self.class_prompts = list(class_prompts) or [class_prompt] * len(self.class_images)
        self.cutmix_probability = cutmix_probability if len(self.subjects) > 1 else 0.0
        self.caption_probability = caption_probability
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0
        self._cut_outs: Dict[int, object] = {}  # id(view) -> `subject_cut_out(view)`, made once per view

    def _cut_out(self, view: Image.Image):
        if id(view) not in self._cut_outs:
            self._cut_outs[id(view)] = subject_cut_out(view)
        return self._cut_outs[id(view)]

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _gen(self, index: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, index, salt)) & 0x7FFFFFFF)

    def _tensor(self, img: Image.Image, index: int, salt: int, flip: bool = True) -> torch.Tensor:
        return to_tensor(img, self.resolution, self.center_crop, self.random_flip and flip, self._gen(index, salt))

    def __getitem__(self, index: int) -> dict:
        img, k, prompt = self.instances[index % len(self.instances)]
        if self.caption_probability < 1.0 and float(torch.rand(1, generator=self._gen(index, 3))) >= \
                self.caption_probability:
            prompt = self.subjects[k].prompt
        item = {"index": index, "prompt": prompt, "mix": None}
        gen = self._gen(index, 2)
        if self.cutmix_probability and float(torch.rand(1, generator=gen)) < self.cutmix_probability:
            others = [j for j in range(len(self.subjects)) if j != k]
            j = others[int(torch.randint(len(others), (1,), generator=gen))]
            partner = self.subjects[j].images[int(torch.randint(len(self.subjects[j].images), (1,), generator=gen))]
            (left, a), (right, b) = ((img, k), (partner, j)) if float(torch.rand(1, generator=gen)) < 0.5 else \
                ((partner, j), (img, k))
            img = cutmix(left, right, self.resolution, [self._cut_out(v) for v in (left, right)])
            item.update(prompt=mixed_prompt(self.subjects[a], self.subjects[b]),
                        mix=(self.subjects[a].identifier, self.subjects[b].identifier))
            item["instance"] = self._tensor(img, index, 0, flip=False)
        else:
            item["instance"] = self._tensor(img, index, 0)
        if self.class_images:
            c = index % len(self.class_images)
            item["class"] = self._tensor(self.class_images[c], index, 1)
            item["class_prompt"] = self.class_prompts[c]
        return item


def collate(items: List[dict]) -> dict:
    batch = {"pixel_values": torch.stack([it["instance"] for it in items]),
             "index": torch.tensor([it["index"] for it in items]),
             "prompts": [it["prompt"] for it in items], "mix": [it["mix"] for it in items]}
    if "class" in items[0]:
        batch["class_prompts"] = [it["class_prompt"] for it in items]
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


def check_user_images(folder: Path, images: List[Image.Image], captions: List[str], caption_extension: Optional[str]
                      ) -> Tuple[List[Image.Image], List[str]]:
    """A user's folder as it should be trained: exact duplicates (the same pixels under two names) dropped, so no
    view weighs twice; one warning each for duplicates, a single image, and caption files present for some images
    but not others. Returns the kept (images, captions)."""
    paths = list_images(folder)
    seen: Dict[bytes, str] = {}
    keep, dupes = [], []
    for i, (path, img) in enumerate(zip(paths, images)):
        digest = hashlib.blake2b(repr(img.size).encode() + img.tobytes(), digest_size=16).digest()
        if digest in seen:
            dupes.append(f"{path.name} is a duplicate of {seen[digest]}")
        else:
            seen[digest] = path.name
            keep.append(i)
    if dupes:
        logger.warning("%s (%d duplicate image(s) in %s, trained once)", "; ".join(dupes[:3]) + (" ..." if len(dupes) > 3
                       else ""), len(dupes), folder)
    images, captions = [images[i] for i in keep], [captions[i] for i in keep]
    if len(images) == 1:
        logger.warning("%s holds only one image: the subject is learnt from one view and tends to be copied as it "
                       "is; 3-20 photos from different angles and places work better", folder)
    if caption_extension:
        missing = [p for i, p in enumerate(paths) if i in keep and not p.with_name(p.stem + caption_extension).is_file()]
        if 0 < len(missing) < len(keep):
            logger.warning("%d of %d images have no caption file (%s): they are trained on the instance prompt",
                           len(missing), len(keep), ", ".join(p.name for p in missing[:3]) +
                           (" ..." if len(missing) > 3 else ""))
    return images, captions


def check_identifier(tokenizer, identifier: Optional[str], class_word: Optional[str], known_words=()) -> str:
    """A warning (also logged) when the identifier will bind the subject badly, else "": it is the class word, a word
    the base already knows (``known_words``, or for a full CLIP vocabulary one of its most frequent quarter), or the
    tokenizer splits it into more than two pieces."""
    if not identifier:
        return ""
    pieces = tokenizer.tokenize(identifier)
    message = ""
    if class_word and identifier == class_word:
        message = (f"the identifier {identifier!r} is the class word: the subject and its class share one word; use a "
                   f"rare word, e.g. 'a photo of sks {class_word}'")
    elif identifier in known_words or (len(getattr(tokenizer, "encoder", {})) >= 49000 and len(pieces) == 1 and
                                       tokenizer.convert_tokens_to_ids(pieces[0]) < len(tokenizer.encoder) // 4):
        message = (f"the identifier {identifier!r} already means something to the base model: the subject will be "
                   "mixed with that meaning; a rare word such as 'sks' binds better")
    elif len(pieces) > 2:
        message = (f"the identifier {identifier!r} splits into {len(pieces)} tokens for this base's tokenizer "
                   f"({' '.join(pieces)}); a rare word of one or two tokens such as 'sks' binds better")
    if message:
        logger.warning("%s", message)
    return message
