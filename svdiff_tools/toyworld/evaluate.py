"""Subject-driven generation measured on the toy world: is the subject there, does the prompt hold, how far
does the class prior drift? Used by the trainer's embedded default and the quality benchmark.

identification: the metric network's nearest-neighbour call (`metric.Identifier`) against renders of the
subject and of other instances of its class; similarity: cosine to the subject's mean identity embedding;
recontextualisation: a prompt that asks for a background (or position, size) and keeps the subject: the
fraction of images whose requested attribute the metric network reads back, and of those that are also
identified as the subject.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from . import metric
from .gate import generate
from .world import RECONTEXT_BACKGROUND, Subject

RECONTEXT = {"background": RECONTEXT_BACKGROUND}


def recontext_prompt(subject: Subject, background: str = RECONTEXT_BACKGROUND) -> str:
    return f"a {subject.identifier} {subject.class_word} on a {background} background"


def score_images(net, identifier: "metric.Identifier", images: torch.Tensor,
                 wanted: Optional[Dict[str, str]] = None) -> dict:
    """Identification rate, mean subject similarity and (with ``wanted``) attribute and joint success."""
    hit = identifier.identify(images)
    out = {"identified": round(float(hit.float().mean()), 4),
           "similarity": round(float(identifier.similarity(images).mean()), 4)}
    if wanted:
        read = net.read(images)
        ok = torch.tensor([all(read[a][i] == v for a, v in wanted.items()) for i in range(len(images))])
        out["attribute"] = round(float(ok.float().mean()), 4)
        out["attribute_and_identified"] = round(float((ok & hit).float().mean()), 4)
    return out


def dreambooth_report(pipe, base_pipe, subject: Subject, seeds: Sequence[int] = range(8), steps: int = 25,
                      guidance: float = 5.0, net=None, rendered: Optional[Dict[str, list]] = None) -> dict:
    """The adapted and the base pipeline on the instance prompt and a recontextualisation prompt, same seeds.
    ``rendered``: prompt -> the adapted pipeline's PIL images for ``seeds`` already made (the trainer's validation
    images), measured instead of generated again."""
    net = net or metric.load()
    identifier = metric.Identifier(net, subject)
    prompts = {"instance": (subject.instance_prompt, None),
               "recontext": (recontext_prompt(subject), dict(RECONTEXT))}
    rendered = rendered or {}
    report: Dict[str, dict] = {}
    for label, p in (("adapted", pipe), ("base", base_pipe)):
        p.set_progress_bar_config(disable=True)
        for key, (prompt, wanted) in prompts.items():
            if label == "adapted" and len(rendered.get(prompt, ())) == len(seeds):
                images = metric.pil_to_tensor(rendered[prompt])
            else:
                images = generate(p, [prompt], seeds, steps, guidance)
            report.setdefault(label, {})[key] = dict(prompt=prompt, **score_images(net, identifier, images, wanted))
    return report


def report_lines(report: dict) -> List[str]:
    """Markdown lines for a model card."""
    lines = ["| pipeline | prompt | identified as the subject | subject similarity | requested attribute |",
             "| --- | --- | --- | --- | --- |"]
    for label in ("adapted", "base"):
        for key, r in report[label].items():
            attr = f"{r['attribute']:.0%}" if "attribute" in r else ""
            lines.append(f"| {label} | `{r['prompt']}` | {r['identified']:.0%} | {r['similarity']:.3f} | {attr} |")
    return lines
