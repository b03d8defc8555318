"""The DreamBooth quality benchmark's smoke run: every figure of the table is computed and written, resumes per
row, and a row that does no better than the base pipeline is reported as such (on the tiny random pipeline,
nothing can be identified, so the row must say so)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from svdiff_trainer.tiny import tiny_pipeline_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_smoke_run_computes_every_figure_and_resumes(tmp_path, capsys):
    import dreambooth_quality

    argv = ["--base", str(tiny_pipeline_path("sd15")), "--resolution", "32", "--steps", "2", "--images", "2",
            "--class_images", "1", "--curve_points", "2", "--inference_steps", "2", "--rows", "svfit r16",
            "--seeds", "1", "--subjects", "example_toy", "--out", str(tmp_path)]
    dreambooth_quality.main(argv)
    table = (tmp_path / "table.md").read_text()
    assert "| base pipeline |" in table and "svfit r16 (no better than the base)" in table
    row = next(line for line in table.splitlines() if line.startswith("| svfit r16"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[1].replace(",", "")) > 0 and int(cells[2].replace(",", "")) > 0  # trainable, file bytes
    assert all(c and c != "nan" and not c.startswith("nanx") for c in cells[3:])
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"].values()
    assert len(run["curve"]) == 2 and {"drift_embedding", "drift_tv", "prompt_fidelity"} <= set(run["final"])
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "grid_example_toy.png").is_file()
    result_file = next(tmp_path.rglob("result.json"))
    result_file.write_text(result_file.read_text().replace('"identified": 0.0', '"identified": 0.0 '))
    before = result_file.stat().st_mtime
    dreambooth_quality.main(argv + ["--skip_cost"])  # resumes: nothing retrained or rescored
    assert result_file.stat().st_mtime == before
    # a fresh checkout holds only what the results folder's .gitignore commits: the scores and the grid strip
    kept = {dreambooth_quality.RESULT, dreambooth_quality.STRIP}
    assert kept <= {p.name for p in result_file.parent.iterdir()}
    for path in sorted(result_file.parent.rglob("*"), reverse=True):
        if path.name not in kept:
            path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "grid_example_toy.png").unlink()
    dreambooth_quality.main(argv + ["--skip_cost"])
    assert result_file.stat().st_mtime == before and not (result_file.parent / "README.md").exists()  # not retrained
    first = json.loads(result_file.read_text())
    assert (tmp_path / "grid_example_toy.png").is_file() and first["commit"]
    assert first["threads"] == torch.get_num_threads()  # alone: this process's threads
    # an interim report: the runs scored so far, nothing trained for a row without scores
    rows = argv.index("--rows") + 1
    interim = argv[:rows] + ["svfit r16,svfit"] + argv[rows + 1:] + ["--skip_cost", "--report_only"]
    dreambooth_quality.main(interim)
    table = (tmp_path / "table.md").read_text()
    labels = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert labels == ["base pipeline", "svfit r16 (no better than the base)"]
    assert not (tmp_path / "example_toy" / "svfit").exists()
    # a second seed through the pool of parallel runs (--jobs), the first one reused
    seeds = argv.index("--seeds") + 1
    dreambooth_quality.main(argv[:seeds] + ["2"] + argv[seeds + 1:] + ["--skip_cost", "--jobs", "2"])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted(runs) == ["example_toy/svfit r16/0", "example_toy/svfit r16/1"]
    assert result_file.stat().st_mtime == before
    second = result_file.parent.parent / "seed1"  # scored; the grid shows seed 0, so no strip
    assert (second / dreambooth_quality.RESULT).is_file() and not (second / dreambooth_quality.STRIP).exists()
    assert json.loads((second / dreambooth_quality.RESULT).read_text())["threads"] == max(1, os.cpu_count() // 2)


def test_the_results_folder_commits_only_scores_and_strips():
    """The full run's folder in the repository keeps what resumes it and nothing heavy."""
    import subprocess

    folder = ROOT / "benchmarks" / "results" / "dreambooth_quality"
    probe = [f"example_toy/svfit/seed0/{name}" for name in ("result.json", "final_strip.png", "README.md",
                                                             "pytorch_svd_weights.safetensors", "validation/a.png")]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probe], cwd=folder, capture_output=True,
                             text=True).stdout.split()
    assert ignored == probe[2:]


@pytest.mark.parametrize("flags, message", [
    (["--rows", "svfit,svfit r8"], "--rows: unknown 'svfit r8'; choose from full FT"),
    (["--subjects", "example_toy,example_dog"], "--subjects: unknown 'example_dog'; toy-world subjects: example_toy"),
    (["--subject", "no/such/folder", "--instance_prompt", "a photo of sks dog"], "not a folder of images"),
    (["--subject", "."], "--subject needs --instance_prompt"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--class_images", "0"], "--class_images must be at least 1"),
    (["--quick", "--images", "0"], "--images must be at least 1"),
])
def test_a_bad_flag_stops_the_run_with_one_line_before_anything_loads(flags, message, tmp_path, monkeypatch):
    import dreambooth_quality

    from svdiff_toyworld import metric

    monkeypatch.setattr(metric, "load", lambda *a, **k: pytest.fail("loaded the metric network for a bad flag"))
    with pytest.raises(SystemExit) as stop:
        dreambooth_quality.main(["--out", str(tmp_path)] + flags)
    assert message in str(stop.value) and "\n" not in str(stop.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_paired_differences_against_the_anchor_match_a_float64_reference():
    """The reading's table: each row minus LoRA r4 on the same (subject, seed), mean and 95% t-interval; a missing
    run drops its pair, not the row."""
    import re

    import dreambooth_quality as dq

    g = torch.Generator().manual_seed(0)
    trainable = {"LoRA r4": 84992, "svfit": 13978, "svdiff (UNet)": 15104}
    results = {(subject, row, seed): {"final": {**{k: float(torch.rand((), generator=g)) for k in dq.PAIRED},
                                                "trainable": trainable[row]}}
               for subject in ("a", "b", "c") for seed in (0, 1) for row in trainable}
    del results[("c", "svdiff (UNet)", 1)]
    lines = dq.paired_lines(results, list(trainable), "LoRA r4")
    table = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines
                                            if line.startswith("| ") and "---" not in line)}
    assert set(table) == {"method", "svfit", "svdiff (UNet)"}
    t975 = {5: 2.5706, 4: 2.7764}  # Student's t, two-sided 95%
    for row, n in (("svfit", 6), ("svdiff (UNet)", 5)):
        cells = table[row]
        assert float(cells[1]) == pytest.approx(trainable[row] / trainable["LoRA r4"], abs=0.005)
        assert int(cells[2]) == n
        for key, cell in zip(dq.PAIRED, cells[3:]):
            d = torch.tensor([r["final"][key] - results[(s, "LoRA r4", e)]["final"][key]
                              for (s, name, e), r in results.items() if name == row], dtype=torch.float64)
            half = t975[n - 1] * d.std() / n ** 0.5
            got = [float(x) for x in re.findall(r"[+-]\d\.\d\d", cell)]
            assert got == pytest.approx([float(d.mean()), float(d.mean() - half), float(d.mean() + half)], abs=0.006)
    assert dq.paired_lines(results, ["svfit"], "LoRA r4") == []  # no anchor among the rows: no table


def test_per_subject_table_averages_each_subjects_seeds():
    import dreambooth_quality as dq

    results = {("car", "svfit", 0): {"final": {"identified": 0.25}}, ("car", "svfit", 1): {"final": {"identified": 0.5}},
               ("toy", "svfit", 0): {"final": {"identified": 1.0}}, ("toy", "LoRA r4", 0): {"final": {"identified": 0.0}}}
    lines = dq.per_subject_lines(results, ["LoRA r4", "svfit", "full FT"])
    assert lines[2] == "| method | car | toy |"
    assert lines[4:] == ["| LoRA r4 | - | 0.00 (1) |", "| svfit | 0.38 (2) | 1.00 (1) |"]  # full FT: no runs, no line
    assert dq.per_subject_lines({k: v for k, v in results.items() if k[0] == "toy"}, ["svfit"]) == []
