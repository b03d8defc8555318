#!/usr/bin/env python
"""SVDiff's own features measured on the toy world (issue 15): two subjects in one image, and single-image editing.

    python benchmarks/svdiff_features.py --out runs/features              # the figures in docs/benchmarks.md
    python benchmarks/svdiff_features.py --quick --out runs/features-quick

Two subjects (default `example_toy` = sks toy and `example_robot` = zwx robot), svdiff adapters trained three
ways with the trainer (prior preservation, the toy world's svdiff learning rate):
- `joint`: one run on both subjects' images (`--subject` twice), plain DreamBooth, twice the one-subject steps;
- `cutmix_unmix`: the same run with `--cutmix_unmix`;
- `composition`: one run per subject, both adapters loaded together (`set_svd_adapters([a, b], [1, 1])`).
Each generates the cut-mix prompt form, "a photo of sks toy on the left and zwx robot on the right", for
`--seeds` seeds. Each half of an image (32 px wide, edge-padded to 64) is read by the metric network: its nearest
neighbour among renders of both subjects and of other instances of their classes says A, B or other. Reported:
both in place (left A, right B), swapped, one subject twice (the two blended into one identity), a half with
neither (a subject missing or blended into something else), and each half's cosine similarity to the subject
it asked for. The same reading of the world's own drawing of the prompt (A small on the left, B small on the
right, every background) is the reader's ceiling.

Editing (SVDiff's CoSINE, `pipelines/edit.py`): each subject's first image, fine-tuned on, DDIM-inverted and
regenerated with "a photo of ID CLASS on a BG background" for each of `--edit_backgrounds`: edit success is the
metric network reading BG, identity preservation the subject's identification and cosine similarity of the edit
(the unedited reconstruction's as the reference).

Writes ``results.json``, ``table.md``, ``two_subjects.png`` (rows: conditions; columns: seeds) and ``edits.png``.
Training runs are kept in ``--out`` and reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONDITIONS = ("joint", "cutmix_unmix", "composition")
CATEGORIES = ("both_in_place", "swapped", "one_subject_twice", "neither_in_a_half")


# ----------------------------------------------------------------------------------- reading two halves
def halves(images: torch.Tensor) -> tuple:
    """(n, 3, h, w) -> left and right halves, each edge-padded back to (n, 3, h, w)."""
    w = images.shape[-1]
    pad = (w // 4, w - w // 2 - w // 4, 0, 0)
    return (F.pad(images[..., : w // 2], pad, mode="replicate"), F.pad(images[..., w // 2:], pad, mode="replicate"))


class HalfReader:
    """Nearest-neighbour identity among renders of several subjects and other instances of their classes:
    label k for subject k, len(subjects) for other."""

    def __init__(self, net, subjects: Sequence):
        from svdiff_toyworld import metric

        self.net = net
        ids = [metric.Identifier(net, s) for s in subjects]
        self.gallery = torch.cat([i.gallery for i in ids])
        other = len(ids)
        self.labels = torch.cat([torch.where(i.is_subject, k, other) for k, i in enumerate(ids)])
        self.means = torch.stack([i.subject_mean for i in ids])

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> tuple:
        """(labels (n,), cosine similarity to each subject's mean (n, k))."""
        e = self.net.embed(images)
        return self.labels[(e @ self.gallery.t()).argmax(-1)], e @ self.means.t()


def two_subject_scores(reader: HalfReader, images: torch.Tensor) -> Dict[str, float]:
    """Fractions of images in each category, and each half's mean similarity to its requested subject."""
    (left, left_sim), (right, right_sim) = (reader.read(h) for h in halves(images))
    frac = lambda mask: round(float(mask.float().mean()), 4)  # noqa: E731
    other = len(reader.means)
    return {"both_in_place": frac((left == 0) & (right == 1)), "swapped": frac((left == 1) & (right == 0)),
            "one_subject_twice": frac((left == right) & (left != other)),
            "neither_in_a_half": frac((left == other) | (right == other)),
            "left_similarity": round(float(left_sim[:, 0].mean()), 4),
            "right_similarity": round(float(right_sim[:, 1].mean()), 4)}


# ----------------------------------------------------------------------------------- training runs
def run_trainer(folder: Path, flags: List[str], args) -> Path:
    """One trainer run (reused when its adapter exists); returns the adapter file."""
    adapter = folder / "svd_adapter.safetensors"
    if adapter.is_file() and (folder / "README.md").is_file():
        return adapter
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--method", "svdiff", *flags,
           "--with_prior_preservation", "--num_class_images", str(args.class_images),
           "--checkpointing_steps", "100000", "--num_validation_images", "1", "--seed", str(args.seed),
           "--output_dir", str(folder), "--overwrite_output_dir"]
    if args.base:
        cmd += ["--pretrained_model_name_or_path", args.base, "--resolution", str(args.resolution)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if result.returncode != 0:
        raise SystemExit(f"training {folder.name} failed:\n{result.stderr[-3000:]}")
    (folder / "train.log").write_text(result.stderr[-20000:])
    return adapter


def train_conditions(subjects, out: Path, args) -> Dict[str, List[Path]]:
    """Adapter files per condition (composition: one per subject)."""
    steps = args.steps
    specs = [f"{s.folder}:{s.identifier}:{s.class_word}" for s in subjects]
    joint = ["--max_train_steps", str(2 * steps), "--class_data_dir", str(out / "class")]
    for spec in specs:
        joint += ["--subject", spec]
    files = {"joint": [run_trainer(out / "joint", joint, args)],
             "cutmix_unmix": [run_trainer(out / "cutmix_unmix", joint + ["--cutmix_unmix"], args)]}
    files["composition"] = [
        run_trainer(out / f"single_{s.name}", ["--instance_data_dir", str(s.folder), "--instance_prompt",
                                              s.instance_prompt, "--class_prompt", f"a photo of a {s.class_word}",
                                              "--class_data_dir", str(out / "class" / s.class_word),
                                              "--max_train_steps", str(steps)], args) for s in subjects]
    return files


def two_subject_prompt(subjects) -> str:
    from svdiff_trainer.data import mixed_prompt

    return mixed_prompt(subjects[0], subjects[1])


# ----------------------------------------------------------------------------------- measurements
def measure_two_subjects(pipe, reader, subjects, files, args) -> tuple:
    import svdiff_tools.diffusers  # noqa: F401  (pipe.load_svd_adapter, set_svd_adapters)
    from svdiff_toyworld.gate import generate

    prompt = two_subject_prompt(subjects)
    seeds = list(range(args.seeds))
    results, images = {}, {}
    for condition in CONDITIONS:
        names = [pipe.load_svd_adapter(str(f), adapter_name=f"{condition}{i}") for i, f in enumerate(files[condition])]
        pipe.set_svd_adapters(names, [1.0] * len(names))
        images[condition] = generate(pipe, [prompt], seeds, args.inference_steps, args.guidance)
        results[condition] = two_subject_scores(reader, images[condition])
        pipe.unload_svd_adapter()
    images["base"] = generate(pipe, [prompt], seeds, args.inference_steps, args.guidance)
    results["base"] = two_subject_scores(reader, images["base"])
    results["the world's own drawing (reader ceiling)"] = two_subject_scores(
        reader, two_object_references([s.toy for s in subjects]))
    return prompt, results, images


def two_object_references(subjects) -> torch.Tensor:
    """What the prompt asks for, drawn by the world itself: subject A small on the left and B small on the right
    (pretraining's two-object layout), on every background; in [-1, 1]."""
    from dataclasses import replace

    from svdiff_toyworld.render import render_tensor
    from svdiff_toyworld.world import BACKGROUNDS, Scene

    a, b = (replace(s.obj, size="small", position=p) for s, p in zip(subjects, ("left", "right")))
    return render_tensor([Scene((a, b), bg) for bg in BACKGROUNDS])


def measure_edits(pipe_loader, net, subjects, args) -> tuple:
    from PIL import Image

    import edit as cosine
    from svdiff_toyworld import metric
    from svdiff_toyworld.metric import pil_to_tensor
    from svdiff_trainer.args import list_images

    rows, grid = [], []
    for s in subjects:
        identifier = metric.Identifier(net, s.toy)
        source = Image.open(list_images(s.folder)[0]).convert("RGB")
        grid_row = [source]
        for bg in args.edit_backgrounds:
            pipe = pipe_loader()
            edited, reconstruction = cosine.edit(pipe, source, s.instance_prompt,
                                                 f"{s.instance_prompt} on a {bg} background", args.edit_steps,
                                                 args.edit_lr, args.inference_steps, args.edit_guidance, args.seed)
            x = pil_to_tensor([edited, reconstruction])
            read = net.read(x)
            hit, sim = identifier.identify(x), identifier.similarity(x)
            rows.append({"subject": s.name, "background": bg, "edit_success": read["background"][0] == bg,
                         "identified": bool(hit[0]), "similarity": round(float(sim[0]), 4),
                         "reconstruction_identified": bool(hit[1]),
                         "reconstruction_similarity": round(float(sim[1]), 4)})
            grid_row += [reconstruction, edited] if len(grid_row) == 1 else [edited]
        grid.append(grid_row)
    return rows, grid


def edit_summary(rows: List[dict]) -> Dict[str, float]:
    mean = lambda key: round(statistics.mean(float(r[key]) for r in rows), 4)  # noqa: E731
    return {k: mean(k) for k in ("edit_success", "identified", "similarity", "reconstruction_identified",
                                  "reconstruction_similarity")}


def table(prompt: str, two: Dict[str, dict], edits: Dict[str, float], n_edits: int, args) -> str:
    lines = [f"Two subjects: `{prompt}`, {args.seeds} seeds; each half read by the metric network.", "",
             "| condition | both in place | swapped | one subject twice | neither in a half | left sim. | right sim. |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in two.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.0%}" for c in CATEGORIES) +
                     f" | {r['left_similarity']:.3f} | {r['right_similarity']:.3f} |")
    lines += ["", f"Editing (CoSINE), {n_edits} edits ({', '.join(args.edit_backgrounds)} backgrounds), "
              f"{args.edit_steps} fine-tuning steps:", "",
              "| edit success | edit identified | edit similarity | reconstruction identified | reconstruction sim. |",
              "| --- | --- | --- | --- | --- |",
              f"| {edits['edit_success']:.0%} | {edits['identified']:.0%} | {edits['similarity']:.3f} | "
              f"{edits['reconstruction_identified']:.0%} | {edits['reconstruction_similarity']:.3f} |"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/svdiff_features")
    p.add_argument("--subjects", nargs=2, default=["example_toy", "example_robot"])
    p.add_argument("--steps", type=int, default=None, help="one subject's training steps (default: the toy "
                   "world's svdiff default; joint runs take twice as many)")
    p.add_argument("--seeds", type=int, default=None, help="default 16 (--quick: 4)")
    p.add_argument("--class_images", type=int, default=50)
    p.add_argument("--inference_steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None, help="default: the toy world's")
    p.add_argument("--edit_backgrounds", nargs="+", default=None, help="default green black (--quick: green)")
    p.add_argument("--edit_steps", type=int, default=None, help="default 150 (--quick: 40)")
    p.add_argument("--edit_lr", type=float, default=1e-3)
    p.add_argument("--edit_guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="another pipeline folder (default: the shipped toy world)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="defaults for a quick look: a quarter of the training steps, "
                   "4 seeds, one edit background, 40 edit steps")
    args = p.parse_args(argv)
    from svdiff_toyworld import preset

    if args.base is None and not preset.available():
        p.error("the toy-world pipeline is not shipped yet; pass --base PIPELINE_FOLDER")
    quick = args.quick
    steps = preset.METHOD_DEFAULTS["svdiff"].steps
    args.steps = args.steps or (max(1, steps // 4) if quick else steps)
    args.seeds = args.seeds or (4 if quick else 16)
    args.edit_steps = args.edit_steps or (40 if quick else 150)
    args.edit_backgrounds = args.edit_backgrounds or (["green"] if quick else ["green", "black"])
    args.guidance = args.guidance or preset.GUIDANCE
    return args


def main(argv=None) -> dict:
    from dreambooth_quality import load_base, shipped_subjects

    from svdiff_toyworld import metric
    from svdiff_toyworld.assets import to_pil
    from svdiff_trainer.images import labelled_grid

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subjects = shipped_subjects(args.subjects)
    files = train_conditions(subjects, out, args)
    net = metric.load()
    reader = HalfReader(net, [s.toy for s in subjects])
    pipe = load_base(args)
    prompt, two, images = measure_two_subjects(pipe, reader, subjects, files, args)
    edit_rows, edit_grid = measure_edits(lambda: load_base(args), net, subjects, args)
    edits = edit_summary(edit_rows)
    text = table(prompt, two, edits, len(edit_rows), args)
    results = {"settings": {k: v for k, v in vars(args).items()}, "prompt": prompt, "two_subjects": two,
               "edits": edit_rows, "edit_summary": edits}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(text + "\n")
    labelled_grid([to_pil(images[c]) for c in ("base", *CONDITIONS)], ["base", *CONDITIONS],
                  caption=prompt).save(out / "two_subjects.png")
    labelled_grid(edit_grid, [f"{s.name}: source | reconstruction | " + " | ".join(args.edit_backgrounds)
                              for s in subjects]).save(out / "edits.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
