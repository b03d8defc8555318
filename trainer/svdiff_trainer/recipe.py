"""The DreamBooth recipe applied to any subject folder: what the main job does for its shipped subject, derived from
the instance prompt and the images, for the flags a user leaves unset.

From ``a photo of zwx car`` (identifier ``zwx``, class ``car``; `read_subject`) a run gets: the class prompt
``a photo of a car``, prior preservation with ``num_class_images`` class images made by the base and cached per base
version, prompt and sampling settings (`class_cache_dir`), the validation prompts (the instance prompt and a
recontextualisation, e.g. ``a zwx car on a green background``) and its steps scaled to the image count (`steps_for`).
A base's `Recipe` says the numbers; embedded presets carry their own (`presets.Preset.recipe`), named bases get
`NAMED_BASE_RECIPE`. Flags the user gives always win; `args.recipe_lines` says what was chosen and how to turn it off.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

ARTICLES = ("a", "an", "the")


@dataclass(frozen=True)
class Recipe:
    """A base's DreamBooth recipe for a user's folder.

    ``prior_preservation``: on by default (class images keep the base's idea of the class); ``num_class_images``;
    ``recontext``: a validation prompt template with ``{identifier}`` and ``{class_word}`` (None: the instance prompt
    only); ``steps``: optimizer steps for ``reference_images`` images where the base's preset gives none;
    ``reference_images``: the image count the base's step defaults were set for, steps scale with the count
    between ``min_scale`` and ``max_scale`` of them; ``class_dir(steps, guidance, resolution, class_word)``: where the
    class images of the standard class prompt are cached (None: `class_cache_dir` under the user's cache); ``known_words``: words the base
    already gives a meaning (an identifier among them is warned about, `data.check_identifier`).
    ``tuned_on``: which subjects its numbers were chosen on (the model card and the docs say it)."""

    prior_preservation: bool = True
    num_class_images: int = 100
    recontext: Optional[str] = "a photo of {identifier} {class_word} on the beach"
    steps: Optional[int] = 400
    reference_images: int = 5
    min_scale: float = 2 / 3
    max_scale: float = 2.0
    class_dir: Optional[Callable[[int, float, int, str], Path]] = None
    tuned_on: str = "not tuned: diffusers' DreamBooth defaults"
    known_words: frozenset = frozenset()


# diffusers' train_dreambooth.py: 100 class images when prior preservation is on; its README's 400-800 steps for
# 4-5 photos; a recontextualisation prompt in the DreamBooth paper's style
NAMED_BASE_RECIPE = Recipe()


def read_subject(instance_prompt: str, class_prompt: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """(identifier, class word) of a DreamBooth prompt, else None.

    With a class prompt, the identifier is the one word the instance prompt adds to it and the class word the word
    after it ("a photo of sks dog" / "a photo of a dog"). Otherwise DreamBooth's forms: "... of [a] <identifier>
    <class> ..." ("a photo of sks dog wearing a hat") or "[a] <identifier> <class> ..." ("sks dog on the beach")."""
    words = re.findall(r"[\w-]+", instance_prompt.lower())
    if class_prompt:
        known = set(re.findall(r"[\w-]+", class_prompt.lower()))
        extra = [i for i, w in enumerate(words) if w not in known and w not in ARTICLES]
        if len(extra) == 1 and extra[0] + 1 < len(words):
            return words[extra[0]], words[extra[0] + 1]
    if "of" in words:
        rest = words[words.index("of") + 1:]
    else:
        rest = words
    rest = rest[1:] if rest and rest[0] in ARTICLES else rest
    if len(rest) >= 2 and rest[0] not in ARTICLES and rest[1] not in ARTICLES:
        return rest[0], rest[1]
    return None


def class_prompt_for(class_word: str) -> str:
    """'a photo of a dog' ('an' before a vowel), DreamBooth's class prompt."""
    return f"a photo of {'an' if class_word[:1] in 'aeiou' else 'a'} {class_word}"


def steps_for(steps: int, images: int, recipe: Recipe) -> int:
    """``steps`` (set for ``recipe.reference_images`` images) scaled to ``images``: the same number of passes over
    each image, within [min_scale, max_scale] of ``steps`` (one photo is not trained a fifth as long; 200 photos
    not forty times)."""
    scale = min(recipe.max_scale, max(recipe.min_scale, images / recipe.reference_images))
    return max(1, round(steps * scale))


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svdiff-tools"


def class_cache_dir(base_tag: str, prompt: str, steps: int, guidance: float, resolution: int) -> Path:
    """A class-image folder per base version (``base_tag``: a weights digest or a hub id and revision), class prompt
    and sampling settings, under the user's cache (``$XDG_CACHE_HOME/svdiff-tools/class-images``): runs on the same
    base and class share it; the record beside the images (`validation.check_class_images`) guards it."""
    key = hashlib.blake2b(f"{base_tag}\0{prompt}\0{steps}\0{guidance:g}\0{resolution}".encode(),
                          digest_size=8).hexdigest()
    slug = re.sub(r"[^\w-]+", "-", prompt.lower()).strip("-")[:40]
    return cache_root() / "class-images" / f"{slug}-{key}"
