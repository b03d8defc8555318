"""The DreamBooth quality benchmark's smoke run: every figure of the table is computed and written, resumes per
row, and a row that does no better than the base pipeline is reported as such (on the tiny random pipeline,
nothing can be identified, so the row must say so)."""

import json
import sys
from pathlib import Path

from svdiff_tools.training.tiny import tiny_pipeline_path

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
