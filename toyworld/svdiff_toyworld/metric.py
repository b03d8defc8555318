"""The toy world's metric network: the DINO / CLIP analogue that reads scenes back.

`MetricNet` maps a 64x64 RGB image to
- *scene* heads (read from the whole image): object count, size, position, background;
- an *identity embedding* (64-d, L2-normalised: the DINO analogue for subject similarity), trained with a
  supervised contrastive loss (two views of one instance under different backgrounds, positions and sizes
  are positives) and read by the *identity* heads: class, shape, colour, pattern, accessory and every
  class's hidden traits (eye style, visor colour ...).
Two-object scenes train only the scene heads. Training streams freshly rendered scenes (held-out
combinations included: the network must read subjects) with blur and noise, so it also reads slightly
degraded (VAE-decoded, generated) images.

    python -m svdiff_toyworld.metric train --out toyworld/svdiff_toyworld/data/metric
    python -m svdiff_toyworld.metric evaluate
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .render import render_batch, to_tensor
from .world import (ACCESSORIES, BACKGROUNDS, CLASSES, COLOURS, PATTERNS, POSITIONS, SHAPES, SIZES, TRAITS,
                    Scene, Subject, ToyObject, random_object, sample_scene)

SCENE_HEADS = {"count": ("one", "two"), "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
IDENTITY_HEADS = {"class": CLASSES, "shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS,
                  "accessory": ("none",) + ACCESSORIES,
                  **{name: choices for traits in TRAITS.values() for name, choices in traits.items()}}
HEADS = {**SCENE_HEADS, **IDENTITY_HEADS}
# Attributes a caption can name (the quality gate reads these).
CAPTION_ATTRIBUTES = ("class", "shape", "colour", "pattern", "size", "position", "background", "accessory")
DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "metric"
EMBED_DIM = 64
IGNORE = -100


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MetricNet(nn.Module):
    """(n, 3, 64, 64) images in [-1, 1] -> {head: logits}, and `embed` -> (n, 64) unit vectors."""

    def __init__(self):
        super().__init__()
        widths = [(5, 32, 2), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2)]
        self.trunk = nn.Sequential(*[_block(a, b, s) for a, b, s in widths])
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(inplace=True))
        self.embedding = nn.Sequential(nn.Linear(256, 256), nn.ReLU(inplace=True), nn.Linear(256, EMBED_DIM))
        self.scene_heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in SCENE_HEADS.items()})
        self.identity_heads = nn.ModuleDict({k: nn.Linear(EMBED_DIM, len(v)) for k, v in IDENTITY_HEADS.items()})
        ramp = torch.linspace(-1, 1, 64)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="ij"))[None], persistent=False)

    def features(self, x: torch.Tensor):
        if x.shape[-2:] != (64, 64):  # other resolutions (a user's images, another pipeline) are read at 64 px
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], 1)
        h = self.feature(self.trunk(x))
        return h, self.embedding(h)

    def forward(self, x: torch.Tensor):
        h, e = self.features(x)
        logits = {k: head(h) for k, head in self.scene_heads.items()}
        logits.update({k: head(e) for k, head in self.identity_heads.items()})
        return logits, F.normalize(e, dim=-1)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x)[1], dim=-1)

    @torch.no_grad()
    def read(self, x: torch.Tensor) -> Dict[str, List[str]]:
        """Predicted attribute names per head for a batch."""
        logits, _ = self(x)
        return {k: [HEADS[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}


# ----------------------------------------------------------------------------------------- labels
def labels(scene: Scene) -> Dict[str, int]:
    """Ground-truth class indices per head; IGNORE where a head does not apply."""
    out = {k: IGNORE for k in HEADS}
    out["count"] = len(scene.objects) - 1
    out["background"] = BACKGROUNDS.index(scene.background)
    if len(scene.objects) != 1:
        return out
    (o,) = scene.objects
    out.update(size=SIZES.index(o.size), position=POSITIONS.index(o.position), **{"class": CLASSES.index(o.cls)},
               shape=SHAPES.index(o.shape), colour=COLOURS.index(o.colour), pattern=PATTERNS.index(o.pattern),
               accessory=IDENTITY_HEADS["accessory"].index(o.accessory or "none"))
    for name, value in o.traits:
        out[name] = IDENTITY_HEADS[name].index(value)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def pil_to_tensor(images) -> torch.Tensor:
    return to_tensor(np.stack([np.asarray(im.convert("RGB").resize((64, 64))) for im in images]))


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur (sigma 0-1.2 px), Gaussian noise (0-0.08) and a small contrast/brightness change."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=g) * 1.2
    k = torch.arange(-2, 3).float()
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)                      # (n, 5)
    xs = x.reshape(1, n * 3, 64, 64)
    kk = kern.repeat_interleave(3, 0)
    xs = F.conv2d(F.pad(xs, (2, 2, 0, 0), mode="replicate"), kk[:, None, None, :], groups=n * 3)
    xs = F.conv2d(F.pad(xs, (0, 0, 2, 2), mode="replicate"), kk[:, None, :, None], groups=n * 3)
    x = xs.reshape(n, 3, 64, 64)
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08
    return x.clamp(-1, 1)


def _view(rng: random.Random, obj: ToyObject) -> Scene:
    o = replace(obj, size=rng.choice(SIZES), position=rng.choice(POSITIONS),
                jitter=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(-0.08, 0.08)))
    return Scene((o,), rng.choice(BACKGROUNDS))


def training_batch(step: int, pairs: int = 48, extra: int = 24):
    """`pairs` instances seen twice (contrastive positives), then `extra` scenes from the world's distribution."""
    rng = random.Random(step * 1_000_003 + 17)
    scenes, ids = [], []
    for i in range(pairs):
        obj = random_object(rng, hold_out=False)
        scenes += [_view(rng, obj), _view(rng, obj)]
        ids += [i, i]
    for j in range(extra):
        scenes.append(sample_scene(rng.randrange(10**12), two_object_rate=0.2, hold_out=False))
        ids.append(pairs + j)
    y = {k: torch.tensor([labels(s)[k] for s in scenes]) for k in HEADS}
    return to_tensor(render_batch(scenes)), y, torch.tensor(ids), pairs * 2


def supcon(e: torch.Tensor, ids: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over unit embeddings `e` (n, d) with instance ids (n,)."""
    sim = e @ e.t() / temperature
    eye = torch.eye(len(e), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (ids[:, None] == ids[None]) & ~eye
    logp = sim.log_softmax(-1)
    has = pos.any(1)
    return -(logp.masked_fill(~pos, 0).sum(1)[has] / pos.sum(1)[has]).mean()


def train(out: Path, steps: int = 3000, lr: float = 2e-3, seed: int = 0, log_every: int = 100,
          init: Optional[Path] = None, vae=None, vae_fraction: float = 0.5) -> MetricNet:
    """Train (or, from ``init``, fine-tune) the network. With ``vae``, a ``vae_fraction`` of every batch is
    replaced by its VAE reconstruction (sampled latents): generated images reach the network through that
    decoder, so it learns to read the world through it (labels stay the scenes' ground truth)."""
    torch.manual_seed(seed)
    net = load(init).train() if init is not None else MetricNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x, y, ids, n_pairs = training_batch(step + (10**6 if init is not None else 0))
        if vae is not None:
            pick = torch.rand(len(x), generator=g) < vae_fraction
            with torch.no_grad():
                x[pick] = vae.decode(vae.encode(x[pick]).latent_dist.sample(g)).sample.clamp(-1, 1)
        x = degrade(x, g)
        logits, e = net(x)
        loss = sum(F.cross_entropy(logits[k], y[k], ignore_index=IGNORE) for k in HEADS if (y[k] != IGNORE).any())
        loss = loss + supcon(e[:n_pairs], ids[:n_pairs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)}),
                  flush=True)
    net.eval()
    save(net, out)
    return net


def save(net: MetricNet, out: Path) -> None:
    """``out/model.safetensors`` in float16, written whole or not at all."""
    from svdiff_tools.atomic import save_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in net.state_dict().items()}
    save_safetensors(state, out / "model.safetensors", metadata={"heads": json.dumps(HEADS)})


def load(path: Optional[Path] = None) -> MetricNet:
    """The shipped metric network (float32, eval mode)."""
    from safetensors.torch import load_file

    path = Path(path or DEFAULT_PATH)
    file = path / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"no metric network at {file}; train one with "
                                f"`python -m svdiff_toyworld.metric train --out {path}`")
    net = MetricNet()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(file)).items()})
    return net.eval()


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy(net: MetricNet, scenes: Sequence[Scene], images: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Per-head accuracy on `scenes` (rendered unless `images` are given), over the scenes each head applies to."""
    x = images if images is not None else to_tensor(render_batch(scenes))
    logits = {}
    for i in range(0, len(x), 256):
        out, _ = net(x[i:i + 256])
        for k, v in out.items():
            logits.setdefault(k, []).append(v.argmax(-1))
    pred = {k: torch.cat(v) for k, v in logits.items()}
    y = {k: torch.tensor([labels(s)[k] for s in scenes]) for k in HEADS}
    return {k: round(float((pred[k] == y[k])[y[k] != IGNORE].float().mean()), 4) for k in HEADS if (y[k] != IGNORE).any()}


class Identifier:
    """Nearest-neighbour subject identification in the identity embedding.

    The gallery holds renders of the subject (every background, position and size) and `distractors`
    renders of other instances of its class; a query image is identified as the subject when its nearest
    gallery embedding (cosine) is one of the subject's renders.
    """

    def __init__(self, net: MetricNet, subject: Subject, distractors: int = 600, seed: int = 0):
        self.net = net
        rng = random.Random(seed)
        own = [subject.view(bg, pos, size) for bg in BACKGROUNDS for pos in POSITIONS for size in SIZES]
        others = []
        while len(others) < distractors:
            o = random_object(rng, cls=subject.obj.cls, hold_out=False)
            if o.identity != subject.obj.identity:
                others.append(_view(rng, o))
        with torch.no_grad():
            self.gallery = torch.cat([net.embed(to_tensor(render_batch(own))),
                                      net.embed(to_tensor(render_batch(others)))])
        self.is_subject = torch.tensor([True] * len(own) + [False] * len(others))
        self.subject_mean = F.normalize(self.gallery[: len(own)].mean(0), dim=0)

    @torch.no_grad()
    def identify(self, images: torch.Tensor) -> torch.Tensor:
        """Bool (n,): nearest gallery neighbour is the subject."""
        e = self.net.embed(images)
        return self.is_subject[(e @ self.gallery.t()).argmax(-1)]

    @torch.no_grad()
    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine (n,) to the subject's mean embedding (DINO-style subject fidelity)."""
        return self.net.embed(images) @ self.subject_mean


def main(argv=None):
    p = argparse.ArgumentParser(description="Train or evaluate the toy world's metric network.")
    p.add_argument("command", choices=["train", "finetune", "evaluate"])
    p.add_argument("--out", default=str(DEFAULT_PATH))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--init", default=None, help="finetune: the network to start from")
    p.add_argument("--vae", default=None, help="finetune: an AutoencoderKL folder whose reconstructions to mix in")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--n", type=int, default=2000, help="evaluate: fresh scenes")
    args = p.parse_args(argv)
    if args.command == "evaluate":
        net = load(Path(args.out))
    elif args.command == "train":
        net = train(Path(args.out), steps=args.steps, lr=args.lr or 2e-3)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval() if args.vae else None
        net = train(Path(args.out), steps=args.steps, lr=args.lr or 5e-4, init=Path(args.init), vae=vae)
    scenes = [sample_scene(2 * 10**9 + i, two_object_rate=0.0, hold_out=False) for i in range(args.n)]
    print(json.dumps({"accuracy_fresh_scenes": accuracy(net, scenes)}, indent=1))


if __name__ == "__main__":
    main()
