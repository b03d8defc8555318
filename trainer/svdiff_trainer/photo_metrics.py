"""The DreamBooth paper's metrics for real photos, with transformers models the user names.

For generated images g_1..g_n of a prompt, real instance images r_1..r_m and unit embeddings e(.):

- DINO (subject fidelity): mean_i mean_j  e_dino(g_i) . e_dino(r_j), with e_dino the CLS token of the last hidden
  state of a self-supervised ViT (DINO ``facebook/dino-vits16`` as the paper, or DINOv2 ``facebook/dinov2-small``);
- CLIP-I: the same with CLIP's projected image embedding (``openai/clip-vit-base-patch32``, ``...-large-patch14``);
- CLIP-T (prompt fidelity): mean_i  e_img(g_i) . e_txt(prompt), the prompt without its identifier (a rare word means
  nothing to CLIP; "a photo of sks dog on the beach" is scored as "a photo of dog on the beach").

Each mean comes with a 95% interval over the generated images (mean +- 1.96 sd / sqrt(n)). Models load with
transformers' own classes (`AutoModel`, `AutoImageProcessor`, `CLIPModel`, `CLIPProcessor`) from a hub id or a
folder; nothing is downloaded here unless the user names a hub id.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

DOCUMENTED = {"dino": ("facebook/dino-vits16", "facebook/dinov2-small"),
              "clip": ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14")}


def mean_interval(values: Sequence[float]) -> Dict[str, float]:
    """{'mean', 'low', 'high', 'n'}: the mean and its 95% normal interval (1.96 standard errors)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4), "n": len(values)}


def without_identifier(prompt: str, identifier: Optional[str]) -> str:
    """The prompt with its identifier word removed (CLIP-T scores what the prompt asks for, not the rare word)."""
    if not identifier:
        return prompt
    return " ".join(re.sub(rf"\b{re.escape(identifier)}\b", " ", prompt).split())


class DinoEmbedder:
    """Unit CLS embeddings of a ViT (DINO / DINOv2) from transformers: ``(images) -> (n, d)``."""

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.model = AutoModel.from_pretrained(name_or_path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self.model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)


class ClipEmbedder:
    """Unit projected CLIP image and text embeddings: ``images(...)``, ``texts(...)`` -> (n, d)."""

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(name_or_path)
        self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        self.device = device

    @staticmethod
    def _tensor(out) -> torch.Tensor:  # transformers 5 returns a model output whose pooler_output is the projection
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return F.normalize(self._tensor(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: List[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(self._tensor(self.model.get_text_features(**tokens)).float(), dim=-1)


@dataclass
class PhotoSubject:
    """A user's subject for the photo metrics: its instance images, identifier and class."""

    images: list
    identifier: Optional[str]
    class_word: Optional[str]
    name: str = "subject"


class PhotoMetrics:
    """DINO, CLIP-I and CLIP-T (see the module docstring) of generated images against a subject's real images."""

    def __init__(self, dino_model: Optional[str] = None, clip_model: Optional[str] = None, device: str = "cpu"):
        if not dino_model and not clip_model:
            raise ValueError("name a DINO model (--dino_model, e.g. facebook/dino-vits16) or a CLIP model "
                             "(--clip_model, e.g. openai/clip-vit-base-patch32) to score photos.")
        self.dino = DinoEmbedder(dino_model, device) if dino_model else None
        self.clip = ClipEmbedder(clip_model, device) if clip_model else None
        self._real: Dict[int, tuple] = {}

    def _real_embeddings(self, subject: PhotoSubject) -> dict:
        """The subject's real images embedded once (kept with the subject, so its id is not reused while cached)."""
        key = id(subject)
        if key not in self._real:
            self._real[key] = (subject, {"dino": self.dino(subject.images) if self.dino else None,
                                         "clip": self.clip.images(subject.images) if self.clip else None})
        return self._real[key][1]

    def score(self, generated, subject: PhotoSubject, prompt: str) -> dict:
        """{'images': n, 'dino', 'clip_i', 'clip_t'} (each a `mean_interval`; a metric whose model is not named is
        left out) of ``generated`` (PIL images of ``prompt``) against ``subject``."""
        real = self._real_embeddings(subject)
        out: dict = {"prompt": prompt, "images": len(generated)}
        if self.dino:
            out["dino"] = mean_interval((self.dino(generated) @ real["dino"].T).mean(1).tolist())
        if self.clip:
            g = self.clip.images(generated)
            out["clip_i"] = mean_interval((g @ real["clip"].T).mean(1).tolist())
            text = self.clip.texts([without_identifier(prompt, subject.identifier)])
            out["clip_t"] = mean_interval((g @ text.T)[:, 0].tolist())
        return out


def metric_text(m: Optional[dict]) -> str:
    return "" if m is None else f"{m['mean']:.3f} ({m['low']:.3f}-{m['high']:.3f})"


class PhotoEvaluator:
    """The trainer's `presets.Evaluator` for real photos: DINO / CLIP-I / CLIP-T of the adapted and the base pipeline
    on the run's validation prompts, same seeds."""

    report_file = "photo_metrics.json"
    title = "Subject measured with DINO and CLIP"

    def __init__(self, dino_model: Optional[str], clip_model: Optional[str], prompts: Sequence[str] = (),
                 device: str = "cpu", resolution: Optional[int] = None):
        self.metrics = PhotoMetrics(dino_model, clip_model, device)
        self.models = {"dino": dino_model, "clip": clip_model}
        self.prompts, self.resolution = list(prompts), resolution

    def subject_for(self, data_dir, instance_prompt: str, identifier=None, class_word=None) -> PhotoSubject:
        from .args import list_images
        from .data import open_rgb
        from .presets import NotMeasurable
        from .recipe import read_subject

        paths = list_images(data_dir) if data_dir.is_dir() else []
        if not paths:
            raise NotMeasurable(f"{data_dir} holds no images to compare with")
        read = read_subject(instance_prompt) or (None, None)
        identifier, class_word = identifier or read[0], class_word or read[1]
        return PhotoSubject([open_rgb(p) for p in paths], identifier, class_word, data_dir.name)

    def measure(self, pipe, load_base, subject: PhotoSubject, seeds, steps: int, guidance: float,
                rendered: Dict[str, list]) -> dict:
        from .validation import render_prompt

        report: dict = {"adapted": {}, "base": {}, "models": self.models}
        base = None
        prompts = self.prompts or list(rendered)
        for k, prompt in enumerate(prompts):
            key = f"prompt {k}"
            images = rendered.get(prompt) or render_prompt(pipe, prompt, seeds, steps, guidance, self.resolution)
            report["adapted"][key] = self.metrics.score(images, subject, prompt)
            base = base or load_base()
            report["base"][key] = self.metrics.score(
                render_prompt(base, prompt, seeds, steps, guidance, self.resolution), subject, prompt)
        return report

    def report_lines(self, report: dict) -> List[str]:
        named = ", ".join(f"{k}: `{v}`" for k, v in report.get("models", {}).items() if v)
        lines = [f"Mean cosine similarities with 95% intervals over the generated images ({named}); DINO and CLIP-I "
                 "against the instance images, CLIP-T against the prompt without its identifier.", "",
                 "| pipeline | prompt | DINO | CLIP-I | CLIP-T |", "| --- | --- | --- | --- | --- |"]
        for label in ("adapted", "base"):
            for r in report[label].values():
                lines.append(f"| {label} | `{r['prompt']}` | {metric_text(r.get('dino'))} | "
                             f"{metric_text(r.get('clip_i'))} | {metric_text(r.get('clip_t'))} |")
        return lines
