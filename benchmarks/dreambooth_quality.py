#!/usr/bin/env python
"""DreamBooth quality on the toy world: every method against PEFT LoRA and full fine-tuning, one protocol.

    python benchmarks/dreambooth_quality.py --out benchmarks/results/dreambooth_quality
                                  # the full run: hours on a CPU; each run's scores are committed as it goes
    python benchmarks/dreambooth_quality.py --quick --out runs/quality-quick   # 1 subject, 1 seed, 4 methods,
                                                                               # 4 images per prompt, 2 curve points
    python benchmarks/dreambooth_quality.py --subject DIR --instance_prompt "a photo of zwx robot"  # a toy-world folder
    python benchmarks/dreambooth_quality.py --subjects green_toy,brown_car   # held-out subjects (`world.TEST_SUBJECTS`)

Each (subject, row, seed) trains with `train_dreambooth.py` (the trainer's documented default learning rate
for the method on this world, the same steps for every row, prior preservation with class images made by the
base and shared by all rows) in its own folder, and is skipped when its `result.json` exists: the run resumes
per row. The trainer renders every evaluation prompt at every `--curve_points` step with the same seeds; the
shipped metric network scores those images:

- subject fidelity: identification rate and cosine to the subject's identity embedding (DINO-style), on
  ``a photo of <id> <class>``;
- prompt fidelity: the fraction whose requested attribute is read back, on four recontextualisation prompts
  (background, position, size, pattern);
- prior drift: ``a photo of a <class>`` against the base pipeline with the same seeds: 1 - cosine of the
  identity embeddings, and the total-variation distance of the attribute distributions (mean over attributes);
- overfitting: identification and prompt fidelity against training steps (`curves.png`);
- cost: trainable parameters, adapter file bytes, and (in this process, on the toy-world UNet, batch 2 at
  64 px) time per training step and peak memory against the frozen floor.

Writes `results.json`, `results.csv`, `table.md`, `curves.png` and `grid_<subject>.png` (rows = methods,
columns = prompts) under `--out`. A row that does no better than the base pipeline is reported as such.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional

import torch

from svdiff_tools.atomic import atomic_path, save_image, write_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ROWS = {  # label -> trainer flags; the rest (learning rate, rank, text encoder) is the trainer's default for the base
    # (`METHOD_DEFAULTS` and `TRAIN_TEXT_ENCODER` on the toy world)
    "full FT": ["--method", "full"],
    "LoRA r4": ["--method", "lora", "--rank", "4"],
    "LoRA r16": ["--method", "lora", "--rank", "16"],
    "PiSSA r4": ["--method", "pissa", "--rank", "4"],
    "svdiff (UNet)": ["--method", "svdiff", "--no-train_text_encoder"],
    "svdiff + TE": ["--method", "svdiff", "--train_text_encoder"],
    "svfit": ["--method", "svfit"],  # the base's default rank (the toy world: 0.99 of each matrix's energy)
    "svfit r16": ["--method", "svfit", "--rank", "16"],
    "svft plain": ["--method", "svft", "--svft_pattern", "plain"],
    "svft banded d=2": ["--method", "svft", "--svft_pattern", "banded", "--svft_offset", "2"],
    "vectorfit": ["--method", "vectorfit"],
    "vectorfit + AVF": ["--method", "vectorfit", "--avf_k", "8", "--avf_interval", "25"],
}
QUICK_ROWS = ["LoRA r4", "svdiff + TE", "svfit", "vectorfit"]
RECONTEXT = {  # attribute -> (prompt template, wanted value)
    "background": ("a {id} {cls} on a green background", "green"),
    "position": ("a {id} {cls} on the left", "left"),
    "size": ("a small {id} {cls}", "small"),
    "pattern": ("a striped {id} {cls}", "striped"),
}
DRIFT_ATTRIBUTES = ("shape", "colour", "pattern", "background", "position", "size")
# What a scored run keeps (the rest of its folder, adapters and validation images, can go): its scores and the
# first final image of each prompt for the grid. `benchmarks/results/dreambooth_quality/.gitignore` commits
# just these, so a run of hours resumes in any checkout.
# A run also records what trained it (the commit and the trainer's thread count: a run is bit-reproducible at one
# thread count, not across them; float sums differ in the last bits and 400 steps amplify that).
RESULT, STRIP, TRAINED_WITH = "result.json", "final_strip.png", "trained_with.json"
PAIRED_ANCHOR = "LoRA r4"  # the reading's reference: LoRA as diffusers' DreamBooth-LoRA script runs it


class Subject:
    """A shipped toy-world subject or a user folder."""

    def __init__(self, name: str, folder: Path, identifier: str, class_word: str, instance_prompt: Optional[str],
                 toy=None):
        self.name, self.folder, self.identifier, self.class_word, self.toy = name, folder, identifier, class_word, toy
        self.instance_prompt = instance_prompt or f"a photo of {identifier} {class_word}"

    def prompts(self) -> Dict[str, str]:
        out = {"instance": self.instance_prompt}
        out.update({a: t.format(id=self.identifier, cls=self.class_word) for a, (t, _) in RECONTEXT.items()})
        out["class"] = f"a photo of a {self.class_word}"
        return out


def shipped_subjects(names: List[str], views: Optional[Path] = None) -> List[Subject]:
    """Toy-world subjects by name: the shipped ones from their folders, the held-out ones (`HELD_OUT_SUBJECTS`)
    written to ``views``/NAME first (`assets.write_subject_images`)."""
    from svdiff_toyworld.assets import DATA, write_subject_images
    from svdiff_toyworld.world import ALL_SUBJECTS, SUBJECTS

    out = []
    for n in names:
        folder = DATA / "subjects" / n
        if n not in SUBJECTS:
            folder = Path(views or "runs/subjects") / n
            if not folder.is_dir():
                write_subject_images(ALL_SUBJECTS[n], folder)
        out.append(Subject(n, folder, ALL_SUBJECTS[n].identifier, ALL_SUBJECTS[n].class_word, None, ALL_SUBJECTS[n]))
    return out


def folder_subject(args, net) -> Subject:
    """``--subject DIR``: its identifier and class from --instance_prompt (or --identifier / --class_word), its
    instance read by the metric network (`infer.infer_subject`), so it is measured as the shipped subjects are."""
    from svdiff_toyworld.infer import infer_subject
    from svdiff_trainer.recipe import read_subject

    read = read_subject(args.instance_prompt) if args.instance_prompt else None
    identifier = args.identifier or (read and read[0])
    class_word = args.class_word or (read and read[1])
    if not identifier or not class_word:
        raise SystemExit("--subject needs --instance_prompt 'a photo of IDENTIFIER CLASS' (or --identifier and "
                         "--class_word)")
    toy, why = infer_subject(Path(args.subject), identifier, class_word, net)
    if toy is None:
        raise SystemExit(f"--subject {args.subject}: {why}")
    return Subject(Path(args.subject).name, Path(args.subject), identifier, class_word, args.instance_prompt, toy)


# ----------------------------------------------------------------------------------- training runs
def list_class_images(folder: Path) -> list:
    from svdiff_trainer.args import list_images

    return list_images(folder) if folder.is_dir() else []


def run_folder(out: Path, subject: Subject, row: str, seed: int) -> Path:
    return out / subject.name / row.replace(" ", "_").replace("+", "plus").replace("=", "") / f"seed{seed}"


def train(subject: Subject, row: str, seed: int, steps: int, out: Path, class_dir: Path, args,
          parallel: bool = False) -> Path:
    """One trainer run (skipped when its final file or its scores exist); returns its folder. ``parallel``: it
    runs beside ``args.jobs - 1`` others, on its share of the cores."""
    folder = run_folder(out, subject, row, seed)
    if (folder / "README.md").is_file() or (folder / RESULT).is_file():
        return folder
    prompts = list(subject.prompts().values())
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), *ROWS[row],
           "--instance_data_dir", str(subject.folder), "--instance_prompt", subject.instance_prompt,
           "--with_prior_preservation", "--class_prompt", subject.prompts()["class"],
           "--class_data_dir", str(class_dir), "--num_class_images", str(args.class_images),
           "--max_train_steps", str(steps), "--validation_steps", str(max(1, steps // args.curve_points)),
           "--checkpointing_steps", str(10 * steps), "--num_validation_images", str(args.images),
           "--validation_prompts", *prompts, "--seed", str(seed), "--validation_seed", str(args.seed0),
           "--output_dir", str(folder),
           "--overwrite_output_dir"]
    from svdiff_toyworld.preset import GUIDANCE

    cmd += ["--guidance_scale", str(GUIDANCE), "--num_inference_steps", str(args.inference_steps)]
    if args.base:
        cmd += ["--pretrained_model_name_or_path", args.base, "--resolution", str(args.resolution)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # alone: this process's thread count (torch's default, or the caller's OMP_NUM_THREADS); beside others: one
    # process per core share (small models scale poorly across threads)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if parallel and args.jobs > 1 else torch.get_num_threads()
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    folder.mkdir(parents=True, exist_ok=True)
    commit = git_commit()  # the code that trains (the scores record it)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{row} on {subject.name} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    write_text(folder / "train.log", result.stderr[-20000:])
    write_text(folder / TRAINED_WITH, json.dumps({"commit": commit, "threads": threads}))
    return folder


def adapter_bytes(folder: Path) -> int:
    files = [p for p in folder.glob("*.safetensors")] + [p for d in ("unet", "text_encoder") for p in
                                                          (folder / d).glob("*.safetensors")]
    return sum(p.stat().st_size for p in files)


def trainable_count(folder: Path) -> int:
    text = (folder / "README.md").read_text()
    line = next(l for l in text.splitlines() if "trainable parameters" in l)
    return int(line.split(":")[1].replace(",", "").strip())


# ----------------------------------------------------------------------------------- scoring
def load_images(folder: Path, step: int, k: int, n: int) -> torch.Tensor:
    from PIL import Image

    from svdiff_toyworld.metric import pil_to_tensor
    from svdiff_trainer.validation import validation_image_name

    names = [folder / "validation" / validation_image_name(step, k, i) for i in range(n)]
    return pil_to_tensor([Image.open(p) for p in names])


def attribute_histogram(read: Dict[str, List[str]]) -> Dict[str, Dict[str, float]]:
    out = {}
    for attr in DRIFT_ATTRIBUTES:
        values = read[attr]
        out[attr] = {v: values.count(v) / len(values) for v in set(values)}
    return out


def total_variation(p: Dict[str, float], q: Dict[str, float]) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def score_run(net, identifier, subject: Subject, folder: Path, steps: int, args, base_class: torch.Tensor,
              strip: bool = True) -> dict:
    """Scores at every validation step (the last is the final adapter reloaded from its file); ``strip``: also
    keep the grid's strip (the grid shows one seed)."""
    prompts = list(subject.prompts())
    checkpoints = sorted({int(p.name[4:10]) for p in (folder / "validation").glob("step*_0.png")})
    curve = {}
    for step in checkpoints:
        entry = {}
        inst = load_images(folder, step, prompts.index("instance"), args.images)
        entry["identified"] = float(identifier.identify(inst).float().mean())
        entry["similarity"] = float(identifier.similarity(inst).mean())
        fidelity = {}
        for attr, (_, wanted) in RECONTEXT.items():
            images = load_images(folder, step, prompts.index(attr), args.images)
            fidelity[attr] = sum(v == wanted for v in net.read(images)[attr]) / len(images)
        entry["prompt_fidelity"] = statistics.mean(fidelity.values())
        entry["prompt_fidelity_by_attribute"] = fidelity
        curve[step] = entry
    final = dict(curve[max(curve)])
    cls = load_images(folder, max(curve), prompts.index("class"), args.images)
    emb, base_emb = net.embed(cls), net.embed(base_class)
    final["drift_embedding"] = float(1 - (emb * base_emb).sum(-1).mean())
    h, h0 = attribute_histogram(net.read(cls)), attribute_histogram(net.read(base_class))
    final["drift_tv"] = statistics.mean(total_variation(h[a], h0[a]) for a in DRIFT_ATTRIBUTES)
    final["trainable"] = trainable_count(folder)
    final["file_bytes"] = adapter_bytes(folder)
    if strip:
        save_image(final_strip(folder, max(curve), len(prompts)), folder / STRIP)
    trained_with = json.loads((folder / TRAINED_WITH).read_text()) if (folder / TRAINED_WITH).is_file() else {}
    return {"final": final, "curve": curve, "commit": trained_with.get("commit") or git_commit(),
            "threads": trained_with.get("threads")}


def final_strip(folder: Path, step: int, n_prompts: int):
    """The first validation image of every prompt at ``step``, side by side (64 px each)."""
    from PIL import Image

    from svdiff_trainer.validation import validation_image_name

    images = [Image.open(folder / "validation" / validation_image_name(step, k, 0)).convert("RGB").resize((64, 64))
              for k in range(n_prompts)]
    strip = Image.new("RGB", (64 * n_prompts, 64))
    for k, image in enumerate(images):
        strip.paste(image, (64 * k, 0))
    return strip


def git_commit() -> Optional[str]:
    """The checkout's commit (recorded with every score), or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def base_scores(net, identifier, subject: Subject, args, out: Path) -> dict:
    """The base pipeline on the same prompts and seeds (cached in `<out>/<subject>/base.pt`)."""
    cache = out / subject.name / "base.pt"
    if cache.is_file():
        images = torch.load(cache, weights_only=True)
    else:
        from svdiff_toyworld.gate import generate

        pipe = load_base(args)
        from svdiff_toyworld.preset import GUIDANCE

        images = {k: generate(pipe, [p], range(args.seed0, args.seed0 + args.images), args.inference_steps, GUIDANCE)
                  for k, p in subject.prompts().items()}
        with atomic_path(cache) as tmp:  # a killed run leaves no truncated cache to load
            torch.save(images, tmp)
    scores = {"identified": float(identifier.identify(images["instance"]).float().mean()),
              "similarity": float(identifier.similarity(images["instance"]).mean())}
    fidelity = {a: sum(v == w for v in net.read(images[a])[a]) / args.images for a, (_, w) in RECONTEXT.items()}
    scores["prompt_fidelity"] = statistics.mean(fidelity.values())
    scores["prompt_fidelity_by_attribute"] = fidelity
    return {"scores": scores, "class_images": images["class"]}


def load_base(args):
    from diffusers import DiffusionPipeline

    from svdiff_toyworld.preset import pipeline_folder

    pipe = DiffusionPipeline.from_pretrained(args.base or pipeline_folder(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------- cost, in this process
def cost_rows(rows: List[str], args) -> dict:
    """Step time and peak memory of each row on the base UNet (batch 2 = instance + class, 64 px) against the
    frozen floor, measured in this process (`benchmarks/common.py`)."""
    import train_step
    from common import cpu_peak_gib, measure

    from svdiff_trainer.args import parse_args
    from svdiff_trainer.backends import make_backend

    base = load_base(args).unet.eval().requires_grad_(False)
    cfg = base.config
    g = torch.Generator().manual_seed(1)
    res = args.resolution // 8
    inputs = (torch.randn(2, cfg.in_channels, res, res, generator=g), torch.full((2,), 500),
              torch.randn(2, 77, cfg.cross_attention_dim, generator=g), {})
    out = {}

    def run(label, unet, params, floor=False):
        unet.train()
        step = train_step.make_step(unet, inputs, params, floor)
        ms, _ = measure(step, "cpu", 2, 8)
        out[label] = {"ms": ms, "peak_gib": cpu_peak_gib(step, step.resident)}

    run("frozen floor", base, [], floor=True)
    for row in rows:
        flags = ROWS[row] + ["--pretrained_model_name_or_path", "unused", "--instance_data_dir",
                             str(ROOT / "trainer" / "svdiff_trainer" / "data" / "example_subject"), "--instance_prompt", "x"]
        targs = parse_args(flags)
        unet = copy.deepcopy(base)
        backend = make_backend(targs)
        backend.inject(unet, {})
        run(row, unet, [p for p in unet.parameters() if p.requires_grad])
        del unet
    floor = out["frozen floor"]
    for v in out.values():
        v["time_ratio"] = v["ms"] / floor["ms"]
        v["memory_ratio"] = v["peak_gib"] / floor["peak_gib"]
    return out


# ----------------------------------------------------------------------------------- output
def mean_spread(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"


def ratio(cost: dict, key: str) -> str:
    return f"{cost[key]:.2f}x" if key in cost else "not measured"


# two-sided 95% quantiles of Student's t, by degrees of freedom (beyond 30: the normal's 1.96)
T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.10,
       2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]
PAIRED = ("identified", "similarity", "prompt_fidelity", "drift_tv")


def mean_interval(values: List[float]) -> str:
    """``mean [lo, hi]``: the mean and its 95% t-interval (one value: the value alone)."""
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:+.2f}"
    df = len(values) - 1
    half = (T95[df - 1] if df <= len(T95) else 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"


def paired_lines(results: dict, rows: List[str], anchor: str) -> List[str]:
    """Each row against ``anchor`` on the same (subject, training seed): the mean difference of each final metric
    and its 95% t-interval over those pairs (the subjects' and seeds' own difficulty cancels in a pair)."""
    finals = {(k[0], k[2]): {} for k in results}
    for (subject, row, seed), r in results.items():
        finals[(subject, seed)][row] = r["final"]
    pairs_of = {row: [f for f in finals.values() if row in f and anchor in f] for row in rows}
    if not pairs_of.get(anchor):
        return []
    lines = [f"Against {anchor}, paired by subject and training seed (mean difference [95% interval]; drift: lower "
             "is less drift):", "",
             "| method | params / " + anchor + " | pairs | identified | subject similarity | prompt fidelity | "
             "prior drift (TV) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        pairs = pairs_of[row]
        if row == anchor or not pairs:
            continue
        share = pairs[0][row]["trainable"] / pairs[0][anchor]["trainable"]
        cells = [mean_interval([p[row][k] - p[anchor][k] for p in pairs]) for k in PAIRED]
        lines.append(f"| {row} | {share:.2f} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines


def per_subject_lines(results: dict, rows: List[str], key: str = "identified") -> List[str]:
    """One row per method, one column per subject: the mean of ``key`` over that subject's seeds (and how many);
    shown only when there are several subjects."""
    subjects = sorted({k[0] for k in results})
    if len(subjects) < 2:
        return []
    lines = [f"{key.replace('_', ' ').capitalize()} per subject (mean over its training seeds; runs):", "",
             "| method | " + " | ".join(subjects) + " |", "| --- |" + " --- |" * len(subjects)]
    for row in rows:
        cells = []
        for subject in subjects:
            values = [r["final"][key] for (s, name, _), r in results.items() if s == subject and name == row]
            cells.append(f"{statistics.mean(values):.2f} ({len(values)})" if values else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(results: dict, base: dict, costs: dict, rows: List[str], out: Path, args) -> str:
    lines = ["| method | trainable params | adapter bytes | identified | subject similarity | prompt fidelity | "
             "prior drift (1 - cos) | prior drift (TV) | step time / floor | peak memory / floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base_ident = statistics.mean(b["scores"]["identified"] for b in base.values())
    base_sim = statistics.mean(b["scores"]["similarity"] for b in base.values())
    base_fid = statistics.mean(b["scores"]["prompt_fidelity"] for b in base.values())
    lines.append(f"| base pipeline | 0 | 0 | {base_ident:.2f} | {base_sim:.2f} | {base_fid:.2f} | 0 | 0 | | |")
    csv_rows = []
    for row in rows:
        finals = [r["final"] for key, r in results.items() if key[1] == row]
        if not finals:
            continue
        col = {k: [f[k] for f in finals] for k in ("identified", "similarity", "prompt_fidelity", "drift_embedding",
                                                    "drift_tv")}
        cost = costs.get(row, {})
        note = " (no better than the base)" if statistics.mean(col["identified"]) <= base_ident else ""
        lines.append(f"| {row}{note} | {finals[0]['trainable']:,} | {finals[0]['file_bytes']:,} | "
                     f"{mean_spread(col['identified'])} | {mean_spread(col['similarity'])} | "
                     f"{mean_spread(col['prompt_fidelity'])} | {mean_spread(col['drift_embedding'])} | "
                     f"{mean_spread(col['drift_tv'])} | {ratio(cost, 'time_ratio')} | {ratio(cost, 'memory_ratio')} |")
        csv_rows.append({"method": row, "trainable": finals[0]["trainable"], "file_bytes": finals[0]["file_bytes"],
                         **{k: statistics.mean(v) for k, v in col.items()}, **cost})
    sections = [lines] + [extra for extra in (per_subject_lines(results, rows),
                                              paired_lines(results, rows, PAIRED_ANCHOR)) if extra]
    table_md = "\n\n".join("\n".join(section) for section in sections)
    write_text(out / "table.md", table_md + "\n")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=sorted({k for r in csv_rows for k in r}))
    writer.writeheader()
    writer.writerows(csv_rows)
    write_text(out / "results.csv", text.getvalue())
    write_text(out / "results.json", json.dumps({"runs": {"/".join(map(str, k)): v for k, v in results.items()},
                                                 "base": {k: v["scores"] for k, v in base.items()},
                                                 "costs": costs}, indent=1))
    curves_png(results, rows, out / "curves.png")
    return table_md


def curves_png(results: dict, rows: List[str], path: Path) -> None:
    """Identification (solid) and prompt fidelity (thin) against training steps, one colour per method."""
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000", "#aa3377"]
    W, H, L, T, B = 900, 420, 60, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = sorted({s for r in results.values() for s in r["curve"]})
    if not steps:
        return
    x = lambda s: L + (W - L - 230) * (s - steps[0]) / max(1, steps[-1] - steps[0])  # noqa: E731
    y = lambda v: T + (H - T - B) * (1 - v)  # noqa: E731
    d.line([(L, T), (L, H - B), (W - 230, H - B)], fill="black")
    for v in (0, 0.5, 1):
        d.text((10, y(v) - 6), f"{v:.1f}", fill="black")
    for s in steps:
        d.text((x(s) - 10, H - B + 6), str(s), fill="black")
    d.text((L, 8), "identification (thick) and prompt fidelity (thin) against steps, mean over seeds/subjects",
           fill="black")
    for i, row in enumerate(rows):
        curves = [r["curve"] for key, r in results.items() if key[1] == row]
        if not curves:
            continue
        colour = colours[i % len(colours)]
        for key, width in (("identified", 3), ("prompt_fidelity", 1)):
            pts = [(x(s), y(statistics.mean(c[s][key] for c in curves if s in c))) for s in steps
                   if any(s in c for c in curves)]
            if len(pts) > 1:
                d.line(pts, fill=colour, width=width)
        d.text((W - 220, T + 16 * i), row, fill=colour)
    save_image(img, path)


def grid_png(subject: Subject, rows: List[str], out: Path, args, seed: int) -> None:
    from PIL import Image

    from svdiff_trainer.images import labelled_grid

    prompts = list(subject.prompts())
    grid_rows, labels = [], []
    for row in rows:
        strip_file = run_folder(out, subject, row, seed) / STRIP
        if not strip_file.is_file():
            continue
        strip = Image.open(strip_file)
        grid_rows.append([strip.crop((64 * k, 0, 64 * k + 64, 64)).resize((96, 96)) for k in range(len(prompts))])
        labels.append(row)
    save_image(labelled_grid(grid_rows, labels, caption=" | ".join(subject.prompts().values())),
               out / f"grid_{subject.name}.png")


def check_flags(args, rows: List[str]) -> None:
    """A bad flag stops the run before anything loads, with one line that says what to give."""
    from svdiff_toyworld.world import ALL_SUBJECTS
    from svdiff_trainer.args import list_images
    from svdiff_trainer.recipe import read_subject

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(ROWS)}")
    for flag in ("seeds", "jobs", "images", "curve_points", "inference_steps", "resolution", "class_images"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be at least 1 (got {args.steps})")
    if args.subject:
        if not (args.identifier and args.class_word) and not (args.instance_prompt and read_subject(args.instance_prompt)):
            raise SystemExit("--subject needs --instance_prompt 'a photo of IDENTIFIER CLASS' (or --identifier and "
                             "--class_word)")
        folder = Path(args.subject)
        if not folder.is_dir() or not list_images(folder):
            raise SystemExit(f"--subject {folder}: not a folder of images; point it at your subject's photos")
    else:
        unknown = [n for n in args.subjects.split(",") if n not in ALL_SUBJECTS]
        if unknown:
            raise SystemExit(f"--subjects: unknown {', '.join(map(repr, unknown))}; toy-world subjects: "
                             f"{', '.join(ALL_SUBJECTS)} (or --subject DIR --instance_prompt PROMPT for your own)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--quick", action="store_true",
                   help="one subject, one seed, four methods, 4 images per prompt, 2 curve points")
    p.add_argument("--subjects", default="example_toy,example_robot,example_car")
    p.add_argument("--subject", default=None, help="a user folder of subject images instead of shipped ones")
    p.add_argument("--class_word", default=None)
    p.add_argument("--instance_prompt", default=None)
    p.add_argument("--identifier", default=None, help="default: read from --instance_prompt")
    p.add_argument("--rows", default=None, help="comma-separated row labels (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the toy world's documented steps")
    p.add_argument("--curve_points", type=int, default=None, help="default: 4 (2 with --quick)")
    p.add_argument("--images", type=int, default=None,
                   help="images per prompt, the same seeds everywhere (default: 8, 4 with --quick)")
    p.add_argument("--class_images", type=int, default=32)
    p.add_argument("--base", default=None, help="pipeline folder (default: the shipped toy world)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--inference_steps", type=int, default=25)
    p.add_argument("--skip_cost", action="store_true")
    p.add_argument("--jobs", type=int, default=None,
                   help="trainer runs at once, each on cpu_count / jobs threads (default: 2 where there are at least "
                        "2 cores; on a 2-core CPU, measured: --quick 1.3x faster, the full run's rows about 1.5-1.8x)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: the table, curves and grids of the runs scored so far (an interim report)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs is None:
        args.jobs = 2 if (os.cpu_count() or 1) >= 2 else 1
    for flag, full, quick in (("curve_points", 4, 2), ("images", 8, 4)):
        if getattr(args, flag) is None:  # a 0 the user gives stays, for check_flags to refuse
            setattr(args, flag, quick if args.quick else full)
    rows = QUICK_ROWS if args.quick else ([r.strip() for r in args.rows.split(",")] if args.rows else list(ROWS))
    check_flags(args, rows)
    from tqdm.auto import tqdm

    from svdiff_toyworld import metric, preset

    seeds = [args.seed0] if args.quick else list(range(args.seed0, args.seed0 + args.seeds))
    steps = args.steps or preset.METHOD_DEFAULTS["svfit"].steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = metric.load()
    if args.subject:
        subjects = [folder_subject(args, net)]
    else:
        subjects = shipped_subjects(args.subjects.split(",")[:1] if args.quick else args.subjects.split(","),
                                    out / "subjects")
    identifiers, base = {}, {}
    started = time.time()
    for subject in subjects:
        identifiers[subject.name] = metric.Identifier(net, subject.toy)
        base[subject.name] = base_scores(net, identifiers[subject.name], subject, args, out)
    tasks = [(subject, row, seed) for subject in subjects for row in rows for seed in seeds]

    def scored(task) -> bool:
        return (run_folder(out, *task) / RESULT).is_file()

    pending = [] if args.report_only else [t for t in tasks if not scored(t)]

    def train_task(task, parallel=True):
        subject, row, seed = task
        return task, train(subject, row, seed, steps, out, out / "class_images" / subject.class_word, args, parallel)

    def score_task(task, folder: Path) -> None:
        subject = task[0]
        result = score_run(net, identifiers[subject.name], subject, folder, steps, args,
                           base[subject.name]["class_images"], strip=task[2] == seeds[0])
        write_text(folder / RESULT, json.dumps(result, indent=1))  # whole or absent: its presence marks a scored run

    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), desc="dreambooth runs") as bar:
        # the first run of each class makes its class images alone (parallel runs would race to write them)
        firsts = {t[0].class_word: t for t in reversed(pending)}
        alone = [t for c, t in firsts.items() if len(list_class_images(out / "class_images" / c)) < args.class_images]
        for task in alone:
            score_task(*train_task(task, parallel=False))
            bar.update(1)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in as_completed([pool.submit(train_task, t) for t in pending if t not in alone]):
                score_task(*future.result())  # scored here, one at a time, by this process's metric network
                bar.update(1)
    results = {}
    for task in filter(scored, tasks):
        result = json.loads((run_folder(out, *task) / RESULT).read_text())
        result["curve"] = {int(k): v for k, v in result["curve"].items()}
        results[(task[0].name, task[1], task[2])] = result
    for subject in subjects:
        grid_png(subject, rows, out, args, seeds[0])
    costs = {} if args.skip_cost else cost_rows(rows, args)
    table_md = write_outputs(results, base, costs, rows, out, args)
    print(table_md)
    print(f"{len(results)} runs of {len(subjects) * len(rows) * len(seeds)}; wall time {time.time() - started:.0f} s; "
          f"outputs in {out}")


if __name__ == "__main__":
    main()
