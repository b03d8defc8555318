#!/usr/bin/env python
"""A user's own subject, as a user trains it: held-out toy-world subjects, the trainer's recipe, its own report.

    python benchmarks/user_subjects.py --out benchmarks/results/user_subjects            # test subjects, svfit + LoRA r4
    python benchmarks/user_subjects.py --set tuning --methods svfit --out runs/tuning     # the tuning subjects

For each subject of the set (`svdiff_toyworld.world.TEST_SUBJECTS`, which no default was tuned on, or
`TUNING_SUBJECTS`) its five views are written to a folder with `assets.write_subject_images` (captions beside
them), and for each method `train_dreambooth.py --method M --instance_data_dir DIR --instance_prompt "a photo of
<id> <class>"` runs with nothing else: every other setting is the recipe's (`svdiff_trainer.recipe`). The run's
own report (``toyworld_report.json``: the metric network reads the subject from its folder, `infer.infer_subject`)
gives instance and recontextualisation identification on its validation seeds. A run whose report exists is
skipped (the benchmark resumes per run). Prints and writes ``table.md``: per method the pooled rates with Wilson
intervals, and per subject; the paired difference to the first method with a t-interval over subjects.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # dreambooth_quality, for its t-interval
METHODS = {"svfit": ["--method", "svfit"], "LoRA r4": ["--method", "lora", "--rank", "4"]}


def run_one(subject, method: str, out: Path, data: Path) -> dict:
    """Train and report one (subject, method); the report as the trainer wrote it (cached per run)."""
    folder = out / method.replace(" ", "_") / subject.name
    result = folder / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    from svdiff_toyworld.assets import write_subject_images

    views = data / subject.name
    if not views.is_dir():
        write_subject_images(subject, views)
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), *METHODS[method], "--instance_data_dir", str(views),
           "--instance_prompt", subject.instance_prompt, "--output_dir", str(folder / "run"), "--overwrite_output_dir"]
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{subject.name} / {method} failed:\n{done.stderr[-3000:]}")
    report = json.loads((folder / "run" / "toyworld_report.json").read_text())
    record = {"subject": subject.name, "method": method, "seconds": round(time.time() - start),
              "read_as": report.get("subject"), "adapted": report["adapted"], "base": report["base"],
              "recipe": [line.split(": ", 1)[-1] for line in done.stderr.splitlines() if "recipe" in line][:3]}
    result.write_text(json.dumps(record, indent=1))
    return record


def pooled(records: List[dict], label: str, prompt: str) -> str:
    hits = sum(round(r[label][prompt]["identified"] * r[label][prompt]["images"]) for r in records)
    n = sum(r[label][prompt]["images"] for r in records)
    from svdiff_toyworld.evaluate import wilson_interval

    lo, hi = wilson_interval(hits, n)
    return f"{hits / n:.0%} ({hits}/{n}; {lo:.0%}-{hi:.0%})"


def paired(a: List[float], b: List[float]) -> str:
    """Mean of a - b over subjects with its 95% t-interval (the quality benchmark's `mean_interval`)."""
    from dreambooth_quality import mean_interval

    return mean_interval([x - y for x, y in zip(a, b)])


def table(results: Dict[str, List[dict]]) -> List[str]:
    methods = list(results)
    lines = ["| method | instance identified (pooled, 95%) | recontext identified | recontext: background and "
             "subject | base: instance | base: recontext | paired vs " + methods[0] + " (instance; recontext) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    first = results[methods[0]]
    for m in methods:
        rs = results[m]
        joint = statistics.mean(r["adapted"]["recontext"].get("attribute_and_identified", 0) for r in rs)
        vs = "" if m == methods[0] else "; ".join(
            paired([r["adapted"][p]["identified"] for r in rs], [r["adapted"][p]["identified"] for r in first])
            for p in ("instance", "recontext"))
        lines.append(f"| {m} | {pooled(rs, 'adapted', 'instance')} | {pooled(rs, 'adapted', 'recontext')} | "
                     f"{joint:.0%} | {pooled(rs, 'base', 'instance')} | {pooled(rs, 'base', 'recontext')} | {vs} |")
    lines += ["", "| subject | read as | " + " | ".join(f"{m}: instance / recontext" for m in methods) + " |",
              "| --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for i, r in enumerate(first):
        cells = [f"{results[m][i]['adapted']['instance']['identified']:.0%} / "
                 f"{results[m][i]['adapted']['recontext']['identified']:.0%}" for m in methods]
        lines.append(f"| {r['subject']} | {r['read_as']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    from svdiff_toyworld.world import ALL_SUBJECTS, TEST_SUBJECTS, TUNING_SUBJECTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", choices=["test", "tuning"], default="test")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--subjects", nargs="+", default=None, help="a part of the set (default: all of it)")
    args = p.parse_args(argv)
    names = args.subjects or list(TEST_SUBJECTS if args.set == "test" else TUNING_SUBJECTS)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {m: [] for m in args.methods}
    for name in names:
        for m in args.methods:
            r = run_one(ALL_SUBJECTS[name], m, args.out, args.out / "subjects")
            results[m].append(r)
            print(f"{name} / {m}: instance {r['adapted']['instance']['identified']:.0%}, recontext "
                  f"{r['adapted']['recontext']['identified']:.0%} ({r['seconds']} s)", flush=True)
    lines = table(results)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.pop("SVDIFF_TOOLS_EMBEDDED", None)
    main()
