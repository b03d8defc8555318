"""The toy world: scenes (objects on backgrounds), their hidden instance traits, and captions.

A scene is one or two objects on a flat background. Every object has a *class* (`toy`, `robot`, `car`)
whose decorations differ, a body *shape*, *colour* and *pattern*, a *size*, a *position*, and hidden
*instance traits* that captions never name (a toy's eye style and accessory colour, a robot's visor
colour, a car's wheel colour ...): the analogue of "dog" vs "my dog". A DreamBooth *subject* is one fixed
instance (all of the above but size, position and background fixed) whose visible combination is held
out of pretraining.

Everything is drawn from a `random.Random` seeded per scene, so `sample_scene(seed)` is deterministic.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

CLASSES = ("toy", "robot", "car")
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
PATTERNS = ("plain", "striped", "dotted")
SIZES = ("small", "big")
POSITIONS = ("center", "left", "right", "top", "bottom")
BACKGROUNDS = ("white", "black", "blue", "green", "yellow", "grey")
ACCESSORIES = ("hat", "bow", "antenna", "badge")          # toys wear exactly one
# Hidden traits per class: name -> choices. Captions never mention them.
TRAITS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "toy": {"eyes": ("dots", "big", "sleepy"), "trim": ("white", "black", "gold", "cyan")},
    "robot": {"visor": ("cyan", "red", "lime"), "arms": ("down", "up"), "legs": ("short", "long")},
    "car": {"wheels": ("black", "grey", "white"), "window": ("round", "square"), "lights": ("yes", "no")},
}
# Words that never occur in pretraining captions (DreamBooth identifiers); whole tokens of the tokenizer.
IDENTIFIERS = ("sks", "zwx", "qhv", "pxl", "vbn")

# (class, shape, colour) triples never drawn in pretraining: the subjects' and the held-out prompts' combos.
HELD_OUT: Tuple[Tuple[str, str, str], ...] = (
    ("toy", "star", "purple"), ("robot", "hexagon", "orange"), ("car", "heart", "blue"),
    ("toy", "triangle", "green"), ("toy", "diamond", "red"), ("robot", "circle", "pink"),
    ("robot", "cross", "yellow"), ("car", "square", "brown"), ("car", "star", "green"),
    ("toy", "hexagon", "pink"), ("robot", "heart", "purple"), ("car", "diamond", "orange"),
)


@dataclass(frozen=True)
class ToyObject:
    """One object: class, body, placement and the hidden traits of its class (sorted (name, value) pairs)."""

    cls: str
    shape: str
    colour: str
    pattern: str
    size: str = "big"
    position: str = "center"
    accessory: Optional[str] = None               # toys only
    traits: Tuple[Tuple[str, str], ...] = ()
    jitter: Tuple[float, float, float] = (0.0, 0.0, 0.0)   # dx, dy (fractions of the canvas), relative size

    def trait(self, name: str) -> str:
        return dict(self.traits)[name]

    @property
    def identity(self) -> Tuple:
        """What makes an instance itself: everything but size, position and jitter."""
        return (self.cls, self.shape, self.colour, self.pattern, self.accessory, self.traits)


@dataclass(frozen=True)
class Scene:
    objects: Tuple[ToyObject, ...]
    background: str

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}


def random_object(rng: random.Random, cls: Optional[str] = None, hold_out: bool = True, **fixed) -> ToyObject:
    """A random instance; with `hold_out` its (class, shape, colour) is never one of `HELD_OUT`."""
    while True:
        c = cls or rng.choice(CLASSES)
        shape, colour = fixed.get("shape") or rng.choice(SHAPES), fixed.get("colour") or rng.choice(COLOURS)
        if not (hold_out and (c, shape, colour) in HELD_OUT):
            break
        if "shape" in fixed and "colour" in fixed:
            raise ValueError(f"({c}, {shape}, {colour}) is held out of pretraining")
    traits = tuple((name, rng.choice(choices)) for name, choices in TRAITS[c].items())
    return ToyObject(cls=c, shape=shape, colour=colour, pattern=fixed.get("pattern") or rng.choice(PATTERNS),
                     size=fixed.get("size") or rng.choice(SIZES), position=fixed.get("position") or rng.choice(POSITIONS),
                     accessory=(fixed.get("accessory") or rng.choice(ACCESSORIES)) if c == "toy" else None,
                     traits=traits, jitter=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(-0.08, 0.08)))


def sample_scene(seed: int, two_object_rate: float = 0.1, hold_out: bool = True) -> Scene:
    """The pretraining distribution: one object (or, at `two_object_rate`, two small ones left and right)."""
    rng = random.Random(seed)
    background = rng.choice(BACKGROUNDS)
    if rng.random() < two_object_rate:
        objects = tuple(random_object(rng, hold_out=hold_out, size="small", position=p) for p in ("left", "right"))
    else:
        objects = (random_object(rng, hold_out=hold_out),)
    return Scene(objects, background)


# ----------------------------------------------------------------------------------------- captions
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}


def object_phrase(obj: ToyObject, rng: Optional[random.Random] = None, name: Optional[str] = None,
                  named: Optional[Dict[str, str]] = None) -> str:
    """'a big red striped star toy with a hat'. With `rng` each attribute is named only sometimes (the class
    always); `named` collects what the phrase says; `name` replaces the article: 'sks toy'."""
    says = (lambda p: True) if rng is None else (lambda p: rng.random() < p)
    named = {} if named is None else named
    words = []
    for attr, p in (("size", 0.4), ("colour", 0.8), ("pattern", 0.5), ("shape", 0.7)):
        value = getattr(obj, attr)
        if says(p) and not (attr == "pattern" and value == "plain"):
            words.append(value)
            named[attr] = value
    words.append(obj.cls)
    named["class"] = obj.cls
    phrase = " ".join(([name] if name else ["a"]) + words)
    if obj.accessory and says(0.5):
        phrase += f" with {'an' if obj.accessory[0] in 'aeiou' else 'a'} {obj.accessory}"
        named["accessory"] = obj.accessory
    return phrase


def describe(scene: Scene, rng: Optional[random.Random] = None) -> Tuple[str, Dict[str, str]]:
    """A grammar caption of `scene` and the attributes it names (one-object scenes; for two objects the
    dict is empty). With `rng` a random subset of attributes is named (pretraining), else all of them."""
    says = (lambda p: True) if rng is None else (lambda p: rng.random() < p)
    named: Dict[str, str] = {}
    if len(scene.objects) == 2:
        a, b = scene.objects
        text = f"{object_phrase(a, rng)} on the left and {object_phrase(b, rng)} on the right"
    else:
        (obj,) = scene.objects
        text = object_phrase(obj, rng, named=named)
        if says(0.5):
            text += " " + POSITION_PHRASES[obj.position]
            named["position"] = obj.position
    if says(0.8):
        text += f" on a {scene.background} background"
        named["background"] = scene.background
    if says(0.3):
        text = "a photo of " + text
    return text, named


def caption(scene: Scene, rng: Optional[random.Random] = None) -> str:
    """`describe`'s text."""
    return describe(scene, rng)[0]


def with_identifier(text: str, rng: random.Random, rate: float) -> str:
    """With probability `rate`, the first object's article becomes a random identifier: 'a photo of a red toy' ->
    'a photo of sks red toy'. Pretraining on such captions gives every identifier its own trained text-encoder
    output and a weak prior, as rare tokens have in CLIP; never seen, all of them share one output (cosine 0.995
    between `sks` and `zwx`), so DreamBooth could not tell two subjects' identifiers apart."""
    if not text or rng.random() >= rate:
        return text
    prefix = "a photo of " if text.startswith("a photo of ") else ""
    rest = text[len(prefix):]
    if not rest.startswith("a "):
        return text
    return prefix + rng.choice(IDENTIFIERS) + rest[1:]


def vocabulary() -> List[str]:
    """Every word the grammar can produce, plus the identifiers (each a whole tokenizer token)."""
    words = {"a", "photo", "of", "with", "on", "background", "and", "the", "in", "at"}
    for group in (CLASSES, SHAPES, COLOURS, PATTERNS, SIZES, BACKGROUNDS, ACCESSORIES, IDENTIFIERS):
        words.update(group)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    words.update({"photos", "picture", "image", "an", "is", "toys", "robots", "cars"})
    return sorted(words)


# ----------------------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class Subject:
    """A DreamBooth subject: one instance (held-out visible combination), its identifier and class word."""

    name: str
    identifier: str
    obj: ToyObject

    @property
    def class_word(self) -> str:
        return self.obj.cls

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.identifier} {self.obj.cls}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.obj.cls}"

    def view(self, background: str, position: str = "center", size: str = "big",
             jitter: Tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Scene:
        return Scene((replace(self.obj, position=position, size=size, jitter=jitter),), background)

    def caption(self, scene: Scene) -> str:
        """A training view's own prompt: the instance prompt plus what the view changes and the subject does not
        (size, position, background), so the identifier is not bound to them: 'a photo of sks big toy on the
        left on a red background'."""
        (obj,) = scene.objects
        return (f"a photo of {self.identifier} {obj.size} {obj.cls} {POSITION_PHRASES[obj.position]} "
                f"on a {scene.background} background")

    def views(self, n: int, seed: int = 0) -> List[Scene]:
        """``n`` training views: every position in turn, sizes alternating, backgrounds other than the
        recontextualisation one (``RECONTEXT_BACKGROUND``), small random jitter (deterministic)."""
        rng = random.Random(seed)
        backgrounds = [b for b in BACKGROUNDS if b != RECONTEXT_BACKGROUND]
        out = []
        for i in range(n):
            out.append(self.view(backgrounds[(i + seed) % len(backgrounds)], POSITIONS[(i * 2 + seed) % len(POSITIONS)],
                                 SIZES[(i + 1) % 2], (rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), 0.0)))
        return out


RECONTEXT_BACKGROUND = "green"  # never in a subject's training views: the recontextualisation prompt asks for it

SUBJECTS: Dict[str, Subject] = {
    "example_toy": Subject("example_toy", "sks", ToyObject(
        "toy", "star", "purple", "dotted", accessory="bow", traits=(("eyes", "sleepy"), ("trim", "gold")))),
    "example_robot": Subject("example_robot", "zwx", ToyObject(
        "robot", "hexagon", "orange", "striped", traits=(("visor", "lime"), ("arms", "up"), ("legs", "long")))),
    "example_car": Subject("example_car", "qhv", ToyObject(
        "car", "heart", "blue", "plain", traits=(("wheels", "white"), ("window", "round"), ("lights", "yes")))),
}

# Subjects no default was chosen on. Every default of the trainer's toy-world recipe (learning rates, steps, caption
# share, class-image count, text-encoder rate) was tuned on the TUNING_SUBJECTS (the sweep: example_toy; the quality
# benchmark: the three shipped ones); results are reported on the TEST_SUBJECTS. Each is a combination held out of
# pretraining (`HELD_OUT`), so the base cannot draw it from words alone; traits vary, and some differ from the
# other instances of their class mostly by a small part (a badge, a visor's colour).
def _subject(name: str, identifier: str, cls: str, shape: str, colour: str, pattern: str, accessory=None, **traits):
    return Subject(name, identifier, ToyObject(cls, shape, colour, pattern, accessory=accessory,
                                               traits=tuple((k, traits[k]) for k in TRAITS[cls])))


HELD_OUT_SUBJECTS: Dict[str, Subject] = {s.name: s for s in (
    _subject("orange_car", "sks", "car", "diamond", "orange", "dotted", wheels="grey", window="square", lights="no"),
    _subject("green_toy", "pxl", "toy", "triangle", "green", "striped", "hat", eyes="big", trim="white"),
    _subject("red_toy", "vbn", "toy", "diamond", "red", "plain", "antenna", eyes="dots", trim="cyan"),
    _subject("pink_toy", "zwx", "toy", "hexagon", "pink", "dotted", "badge", eyes="sleepy", trim="black"),
    _subject("pink_robot", "qhv", "robot", "circle", "pink", "plain", visor="red", arms="down", legs="short"),
    _subject("yellow_robot", "sks", "robot", "cross", "yellow", "dotted", visor="cyan", arms="up", legs="short"),
    _subject("purple_robot", "pxl", "robot", "heart", "purple", "striped", visor="lime", arms="down", legs="long"),
    _subject("brown_car", "vbn", "car", "square", "brown", "striped", wheels="grey", window="square", lights="no"),
    _subject("green_car", "zwx", "car", "star", "green", "dotted", wheels="black", window="round", lights="yes"),
)}
TUNING_SUBJECTS = ("example_toy", "example_robot", "example_car", "orange_car")
TEST_SUBJECTS = ("green_toy", "red_toy", "pink_toy", "pink_robot", "yellow_robot", "purple_robot", "brown_car",
                 "green_car")
ALL_SUBJECTS: Dict[str, Subject] = {**SUBJECTS, **HELD_OUT_SUBJECTS}
