"""Any folder of toy-world images as a measurable subject: the metric network reads the instance's attributes.

`infer_subject` reads every identity head (class, shape, colour, pattern, accessory and the class's hidden traits)
on each instance image, takes the majority per head, and builds the `Subject` the report then identifies against
its own renders, exactly as for a shipped subject. It refuses (with the reason) a folder whose images do not agree
on one instance, or whose class is not the prompt's.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Optional, Tuple

from .world import CLASSES, TRAITS, Subject, ToyObject

# Below this share of images agreeing with the majority on some head, the folder is not one toy-world instance
# (the shipped subjects' views agree on every head: 1.0).
MIN_AGREEMENT = 0.6


def read_images(folder: Path):
    """The folder's images as the trainer reads them (EXIF-rotated, alpha on white), (n, 3, 64, 64) in [-1, 1]."""
    from svdiff_trainer.args import list_images
    from svdiff_trainer.data import open_rgb

    from .metric import pil_to_tensor

    paths = list_images(Path(folder))
    return pil_to_tensor([open_rgb(p) for p in paths]) if paths else None


def infer_subject(folder: Path, identifier: str, class_word: str, net=None) -> Tuple[Optional[Subject], str]:
    """(the subject the folder shows, "") or (None, why not). ``class_word`` must be a toy-world class."""
    from . import metric

    if class_word not in CLASSES:
        return None, f"the toy world has no class {class_word!r} (it has {', '.join(CLASSES)})"
    images = read_images(folder)
    if images is None:
        return None, f"{folder} holds no images"
    net = net or metric.load()
    read = net.read(images)
    heads = ["class", "shape", "colour", "pattern"] + (["accessory"] if class_word == "toy" else []) + \
        list(TRAITS[class_word])
    majority, agreement = {}, {}
    for head in heads:
        value, count = Counter(read[head]).most_common(1)[0]
        majority[head], agreement[head] = value, count / len(images)
    if majority["class"] != class_word:
        return None, (f"the metric network reads these images as a {majority['class']}, not the prompt's "
                      f"{class_word}")
    weak = {h: a for h, a in agreement.items() if a < MIN_AGREEMENT}
    if weak:
        return None, ("the images do not show one toy-world instance (they disagree on " +
                      ", ".join(f"{h}: {a:.0%} agree" for h, a in weak.items()) + ")")
    obj = ToyObject(class_word, majority["shape"], majority["colour"], majority["pattern"],
                    accessory=majority.get("accessory") if class_word == "toy" else None,
                    traits=tuple((t, majority[t]) for t in TRAITS[class_word]))
    name = "read-" + hashlib.blake2b(repr((identifier, obj.identity)).encode(), digest_size=5).hexdigest()
    return Subject(name, identifier, obj), ""


def describe(subject: Subject) -> str:
    """'a purple dotted star toy with a bow (eyes sleepy, trim gold)'."""
    o = subject.obj
    pattern = "" if o.pattern == "plain" else f"{o.pattern} "
    extra = f" with {'an' if o.accessory[0] in 'aeiou' else 'a'} {o.accessory}" if o.accessory else ""
    return f"a {o.colour} {pattern}{o.shape} {o.cls}{extra} ({', '.join(f'{k} {v}' for k, v in o.traits)})"
