"""Quality gate of a toy-world pipeline: do generated images show what their prompts say?

For `n` grammar prompts (a random subset of attributes named, as in pretraining) and a few seeds each,
the metric network reads every generated image; an attribute counts as correct when the network reads
what the prompt names. Reported per attribute over the prompts that name it, and the same on prompts
whose (class, shape, colour) combination was held out of pretraining (compositional generalisation).

    python -m svdiff_toyworld.gate [--pipeline DIR] [--prompts 256] [--seeds 4] [--grid docs/x.png]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch

from svdiff_tools.atomic import save_image

from . import metric
from .render import render_tensor
from .world import HELD_OUT, Scene, describe, random_object, sample_scene

GATE_SEED = 3 * 10**9
HELD_OUT_SEED = 4 * 10**9
GOALS = {"class": 0.9, "shape": 0.9, "colour": 0.9, "background": 0.9, "pattern": 0.75, "position": 0.75}


def grammar_prompts(n: int, seed: int = GATE_SEED) -> List[Tuple[str, Dict[str, str]]]:
    """`n` one-object prompts from the pretraining distribution, with the attributes each names."""
    return [describe(sample_scene(seed + i, two_object_rate=0.0), random.Random(seed + i)) for i in range(n)]


def held_out_prompts(n: int, seed: int = HELD_OUT_SEED) -> List[Tuple[str, Dict[str, str]]]:
    """`n` prompts naming a held-out (class, shape, colour) combination, other attributes at random."""
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        cls, shape, colour = HELD_OUT[i % len(HELD_OUT)]
        obj = random_object(rng, cls=cls, hold_out=False, shape=shape, colour=colour)
        scene = Scene((obj,), sample_scene(seed + i).background)
        text, named = describe(scene, rng)
        while not {"shape", "colour"} <= set(named):      # the held-out pair must be named
            text, named = describe(scene, rng)
        out.append((text, named))
    return out


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 5.0,
             batch: int = 64) -> torch.Tensor:
    """Images (len(prompts) * len(seeds), 3, 64, 64) in [-1, 1]; prompt-major order, seed s for each."""
    items = [(p, s) for p in prompts for s in seeds]
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        images = pipe([p for p, _ in chunk], generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                      output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)


def score(net, images: torch.Tensor, named: Sequence[Dict[str, str]], per: int) -> Dict[str, float]:
    """Fraction of images whose read attribute equals the named one, per attribute."""
    read = net.read(images) if len(images) <= 512 else {
        k: sum((net.read(images[i:i + 512])[k] for i in range(0, len(images), 512)), []) for k in metric.HEADS}
    hits, counts = defaultdict(int), defaultdict(int)
    for j, wanted in enumerate(named):
        for img in range(j * per, (j + 1) * per):
            for attr, value in wanted.items():
                counts[attr] += 1
                hits[attr] += int(read[attr][img] == value)
    return {a: round(hits[a] / counts[a], 4) for a in sorted(counts)}


def attribute_accuracy(pipe, n_prompts: int = 256, seeds: Sequence[int] = (0, 1, 2, 3), steps: int = 25,
                       guidance: float = 5.0, held_out: int = 0, net=None) -> dict:
    net = net or metric.load()
    prompts = grammar_prompts(n_prompts)
    images = generate(pipe, [p for p, _ in prompts], seeds, steps, guidance)
    result = {"accuracy": score(net, images, [n for _, n in prompts], len(seeds)), "images": images,
              "prompts": [p for p, _ in prompts]}
    if held_out:
        ho = held_out_prompts(held_out)
        ho_images = generate(pipe, [p for p, _ in ho], seeds, steps, guidance)
        result["held_out"] = score(net, ho_images, [n for _, n in ho], len(seeds))
    return result


@torch.no_grad()
def vae_report(vae, net=None, n: int = 512, seed: int = GATE_SEED + 7) -> dict:
    """The VAE's gate: PSNR of reconstructions of ``n`` fresh scenes, and the metric network's accuracy on the
    clean images against the reconstructed ones (caption attributes)."""
    net = net or metric.load()
    scenes = [sample_scene(seed + i, two_object_rate=0.0, hold_out=False) for i in range(n)]
    x = render_tensor(scenes)
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 128]).latent_dist.mode()).sample for i in range(0, n, 128)])
    clean, recon = metric.accuracy(net, scenes, x), metric.accuracy(net, scenes, rec.clamp(-1, 1))
    keep = [a for a in metric.CAPTION_ATTRIBUTES if a in clean]
    return {"psnr": round(metric.psnr(rec, x), 2), "clean": {a: clean[a] for a in keep},
            "reconstructed": {a: recon[a] for a in keep}}


def passes(accuracy: Dict[str, float]) -> bool:
    return all(accuracy.get(k, 0.0) >= v for k, v in GOALS.items())


def table(result: dict) -> str:
    rows = ["| attribute | grammar prompts | held-out combinations | goal |", "| --- | --- | --- | --- |"]
    for attr in sorted(result["accuracy"]):
        ho = result.get("held_out", {}).get(attr)
        goal = GOALS.get(attr)
        rows.append(f"| {attr} | {result['accuracy'][attr]:.1%} | {'' if ho is None else f'{ho:.1%}'} | "
                    f"{'' if goal is None else f'>= {goal:.0%}'} |")
    return "\n".join(rows)


def main(argv=None):
    from diffusers import StableDiffusionPipeline

    from .assets import pipeline_path

    p = argparse.ArgumentParser(description="Quality gate of a toy-world pipeline (prints a markdown table).")
    p.add_argument("--pipeline", default=None, help="pipeline folder; default: the shipped toy world")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--held_out", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--grid", default=None, help="write a prompt -> images grid here")
    args = p.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline or pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    result = attribute_accuracy(pipe, args.prompts, range(args.seeds), args.steps, args.guidance, args.held_out)
    print(table(result))
    print(json.dumps({"passes": passes(result["accuracy"])}))
    if args.grid:
        from .assets import prompt_grid

        save_image(prompt_grid(result["images"], result["prompts"], args.seeds, rows=12), args.grid)


if __name__ == "__main__":
    main()
