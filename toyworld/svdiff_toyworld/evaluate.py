"""Subject-driven generation measured on the toy world: is the subject there, does the prompt hold, how far
does the class prior drift? Used by the trainer's embedded default and the quality benchmark.

identification: the metric network's nearest-neighbour call (`metric.Identifier`) against renders of the
subject and of other instances of its class; similarity: cosine to the subject's mean identity embedding;
recontextualisation: a prompt that asks for a background (or position, size) and keeps the subject: the
fraction of images whose requested attribute the metric network reads back, and of those that are also
identified as the subject.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from svdiff_tools.atomic import write_text

from . import metric
from .gate import generate
from .world import RECONTEXT_BACKGROUND, Subject

logger = logging.getLogger(__name__)

RECONTEXT = {"background": RECONTEXT_BACKGROUND}


def recontext_prompt(subject: Subject, background: str = RECONTEXT_BACKGROUND) -> str:
    return f"a {subject.identifier} {subject.class_word} on a {background} background"


def wilson_interval(hits: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """Wilson score interval of a rate ``hits / n`` (95% at z = 1.96): the p with (hits/n - p)^2 = z^2 p (1-p) / n,
    i.e. (p^ + z^2/2n +- z sqrt(p^(1-p^)/n + z^2/4n^2)) / (1 + z^2/n). On 16 images a measured 69% is 44-86%."""
    if n <= 0:
        raise ValueError(f"a rate needs at least one image, got n={n}")
    rate, zz = hits / n, z * z / n
    centre = (rate + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(rate * (1 - rate) / n + zz / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def score_images(net, identifier: "metric.Identifier", images: torch.Tensor,
                 wanted: Optional[Dict[str, str]] = None) -> dict:
    """Identification rate, mean subject similarity and (with ``wanted``) attribute and joint success, over
    ``images`` ((n, 3, H, W); their count is kept, so a rate can be given with its interval)."""
    hit = identifier.identify(images)
    out = {"images": len(images), "identified": round(float(hit.float().mean()), 4),
           "similarity": round(float(identifier.similarity(images).mean()), 4)}
    if wanted:
        read = net.read(images)
        ok = torch.tensor([all(read[a][i] == v for a, v in wanted.items()) for i in range(len(images))])
        out["attribute"] = round(float(ok.float().mean()), 4)
        out["attribute_and_identified"] = round(float((ok & hit).float().mean()), 4)
    return out


def dreambooth_report(pipe, load_base: Callable[[], object], subject: Subject, seeds: Sequence[int] = range(8),
                      steps: int = 25, guidance: float = 5.0, net=None, rendered: Optional[Dict[str, list]] = None,
                      base_cache: Optional[Path] = None) -> dict:
    """The adapted and the base pipeline on the instance prompt and a recontextualisation prompt, same seeds.
    ``rendered``: prompt -> the adapted pipeline's PIL images for ``seeds`` already made (the trainer's validation
    images), measured instead of generated again. ``load_base()`` returns the base pipeline; it is called only when
    a base score is not in ``base_cache`` (a JSON file: the base's scores keyed by subject, prompt, seeds, steps and
    guidance; the caller names one file per base version)."""
    net = net or metric.load()
    identifier = metric.Identifier(net, subject)
    prompts = {"instance": (subject.instance_prompt, None),
               "recontext": (recontext_prompt(subject), dict(RECONTEXT))}
    rendered = rendered or {}
    cached, base_pipe, measured = _read_json(base_cache), None, False
    report: Dict[str, dict] = {"adapted": {}, "base": {}}

    def scores(p, prompt: str, wanted: Optional[Dict[str, str]], done=()) -> dict:
        if len(done) == len(seeds):
            images = metric.pil_to_tensor(done)
        else:
            p.set_progress_bar_config(disable=True)
            images = generate(p, [prompt], seeds, steps, guidance)
        return dict(prompt=prompt, **score_images(net, identifier, images, wanted))

    for key, (prompt, wanted) in prompts.items():
        report["adapted"][key] = scores(pipe, prompt, wanted, rendered.get(prompt, ()))
        tag = json.dumps([subject.name, prompt, list(seeds), steps, guidance])
        if tag not in cached:
            if base_pipe is None:
                base_pipe = load_base()
            cached[tag], measured = scores(base_pipe, prompt, wanted), True
        report["base"][key] = dict(cached[tag], images=len(seeds))  # scores cached before the count was kept
    if base_cache is not None and measured:
        try:
            write_text(base_cache, json.dumps(cached, indent=1))
        except OSError as exc:
            logger.warning("base scores not cached (%s: %s); they are measured again next time", base_cache, exc)
    return report


def _read_json(path: Optional[Path]) -> dict:
    """A cache file's dict; {} when absent or unreadable (it is then measured again and rewritten)."""
    try:
        data = json.loads(Path(path).read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def identified_text(r: dict) -> str:
    """'69% (11 of 16; 95%: 44-86%)': the rate, its count and its Wilson interval (the rate alone without a count)."""
    n = r.get("images")
    if not n:
        return f"{r['identified']:.0%}"
    hits = round(r["identified"] * n)
    lo, hi = wilson_interval(hits, n)
    return f"{r['identified']:.0%} ({hits} of {n}; 95%: {100 * lo:.0f}-{hi:.0%})"


def report_lines(report: dict) -> List[str]:
    """Markdown lines for a model card: each rate with how many images it counts and its 95% interval, since 16
    images leave about +-20 points."""
    lines = ["| pipeline | prompt | identified as the subject | subject similarity | requested attribute |",
             "| --- | --- | --- | --- | --- |"]
    for label in ("adapted", "base"):
        for key, r in report[label].items():
            attr = f"{r['attribute']:.0%}" if "attribute" in r else ""
            lines.append(f"| {label} | `{r['prompt']}` | {identified_text(r)} | {r['similarity']:.3f} | {attr} |")
    return lines
