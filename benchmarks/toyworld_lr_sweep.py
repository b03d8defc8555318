#!/usr/bin/env python
"""Learning rates for the toy world's main job: a grid per method, the trainer's own measurements, one choice.

    python benchmarks/toyworld_lr_sweep.py --out runs/lr_sweep                       # every method, the default grid
    python benchmarks/toyworld_lr_sweep.py --methods svfit lora --factors 0.3 1 3 --seeds 0 1

Each point is the main job as a user runs it (`train_dreambooth.py --method M --learning_rate LR`, everything else
the toy world's defaults: the shipped subject, prior preservation, the default steps), whose trainer writes
`toyworld_report.json`: the subject identification rate of the validation images on the instance prompt and on
the recontextualisation prompt (`a sks toy on a green background`), with the base pipeline's on the same seeds.
Score = mean of the instance prompt's identification and the recontextualisation prompt's "identified and
background read back" over the seeds; the chosen rate is the best score (ties: the smaller rate). The grid is
the method's current default times ``--factors``. Runs are kept in ``--out`` and reused.

Prints a table and the `METHOD_DEFAULTS` lines for `svdiff_toyworld/preset.py`; writes `sweep.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from svdiff_trainer.args import all_methods

ROOT = Path(__file__).resolve().parents[1]
METHODS = all_methods()  # the trainer's: every registered spectral method, LoRA, PiSSA, full fine-tuning


def score(report: dict) -> float:
    """The sweep's objective from one `toyworld_report.json`."""
    adapted = report["adapted"]
    return 0.5 * (adapted["instance"]["identified"] + adapted["recontext"]["attribute_and_identified"])


def choose(points: Dict[float, List[float]]) -> float:
    """The learning rate with the best mean score over seeds; ties go to the smaller rate."""
    return min(points, key=lambda lr: (-statistics.mean(points[lr]), lr))


def train(method: str, lr: float, seed: int, out: Path) -> dict:
    folder = out / method / f"lr{lr:g}" / f"seed{seed}"
    report = folder / "toyworld_report.json"
    if not report.is_file():
        cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--method", method, "--learning_rate", str(lr),
               "--seed", str(seed), "--output_dir", str(folder), "--overwrite_output_dir"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("SVDIFF_TOOLS_EMBEDDED", None)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not report.is_file():
            raise SystemExit(f"{method} at lr {lr:g} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    return json.loads(report.read_text())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--factors", nargs="+", type=float, default=[0.3, 1.0, 3.0, 10.0],
                   help="the grid: the method's current default learning rate times each factor")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="runs/lr_sweep")
    args = p.parse_args(argv)
    from svdiff_toyworld import preset

    if not preset.available():
        p.error(f"no toy-world pipeline at {preset.pipeline_folder()}; the sweep tunes the main job on it, so "
                "pretrain and export it first (docs/toyworld.md)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from svdiff_toyworld.preset import METHOD_DEFAULTS

    out = Path(args.out)
    results, lines = {}, ["| method | learning rate | score (mean over seeds) | instance identified | "
                          "recontext identified + background | base instance identified |", "|---|---|---|---|---|---|"]
    for method in args.methods:
        defaults = METHOD_DEFAULTS[method]
        points: Dict[float, List[float]] = {}
        for factor in args.factors:
            lr = float(f"{defaults.learning_rate * factor:.3g}")
            reports = [train(method, lr, seed, out) for seed in args.seeds]
            points[lr] = [score(r) for r in reports]
            mean = lambda f: statistics.mean(f(r) for r in reports)  # noqa: E731
            lines.append(f"| {method} | {lr:g} | {statistics.mean(points[lr]):.3f} | "
                         f"{mean(lambda r: r['adapted']['instance']['identified']):.0%} | "
                         f"{mean(lambda r: r['adapted']['recontext']['attribute_and_identified']):.0%} | "
                         f"{mean(lambda r: r['base']['instance']['identified']):.0%} |")
        best = choose(points)
        results[method] = {"chosen": best, "steps": defaults.steps, "rank": defaults.rank,
                           "points": {f"{k:g}": v for k, v in points.items()}}
    (out / "sweep.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    print("\n".join(lines))
    print("\nMETHOD_DEFAULTS lines:")
    for method, r in results.items():
        rank = "" if r["rank"] is None else f', rank={r["rank"]:g}'
        print(f'    "{method}": MethodDefaults({r["chosen"]:g}, {r["steps"]}, SWEEP{rank}),')
    return results


if __name__ == "__main__":
    main()
