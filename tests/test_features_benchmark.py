"""The SVDiff-features benchmark (issue 15): its half reader against the world's own drawings, and a smoke run
on the tiny random pipeline that computes and writes every figure and reuses its training runs."""

import json
import sys
from pathlib import Path

import pytest

from svdiff_toyworld import metric
from svdiff_toyworld.world import SUBJECTS
from svdiff_trainer.tiny import tiny_pipeline_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import svdiff_features as features  # noqa: E402
from dreambooth_quality import shipped_subjects  # noqa: E402


@pytest.fixture(scope="module")
def reader():
    return features.HalfReader(metric.load(), [SUBJECTS["example_toy"], SUBJECTS["example_robot"]])


@pytest.mark.parametrize("pair, expected", [
    (("example_toy", "example_robot"), "both_in_place"),
    (("example_robot", "example_toy"), "swapped"),
    (("example_toy", "example_toy"), "one_subject_twice"),
    (("example_car", "example_robot"), "neither_in_a_half"),
])
def test_the_half_reader_reads_the_worlds_own_two_object_drawings(reader, pair, expected):
    images = features.two_object_references([SUBJECTS[n] for n in pair])
    scores = features.two_subject_scores(reader, images)
    assert scores[expected] == 1.0
    assert sum(scores[c] for c in features.CATEGORIES) == pytest.approx(1.0)  # the categories are exclusive


def test_smoke_run_computes_every_figure_and_reuses_its_runs(tmp_path):
    argv = ["--base", str(tiny_pipeline_path("sd15")), "--resolution", "32", "--steps", "1", "--seeds", "2",
            "--class_images", "1", "--inference_steps", "2", "--edit_steps", "1", "--edit_backgrounds", "green",
            "--out", str(tmp_path)]
    results = features.main(argv)
    assert set(results["two_subjects"]) == {*features.CONDITIONS, "base", "the world's own drawing (reader ceiling)"}
    for row in results["two_subjects"].values():
        assert sum(row[c] for c in features.CATEGORIES) == pytest.approx(1.0)
        assert -1.0 <= row["left_similarity"] <= 1.0
    assert results["two_subjects"]["the world's own drawing (reader ceiling)"]["both_in_place"] == 1.0
    assert len(results["edits"]) == 2 and {"edit_success", "similarity"} <= set(results["edit_summary"])
    assert json.loads((tmp_path / "results.json").read_text())["prompt"] == results["prompt"]
    for name in ("table.md", "two_subjects.png", "edits.png"):
        assert (tmp_path / name).is_file()
    adapters = sorted(tmp_path.rglob("svd_adapter.safetensors"))
    assert len(adapters) == 4  # joint, cut-mix-unmix, one per subject for composition
    before = [p.stat().st_mtime for p in adapters]
    features.train_conditions(shipped_subjects(["example_toy", "example_robot"]), tmp_path,
                              features.parse_args(argv))
    assert [p.stat().st_mtime for p in adapters] == before  # reused, not retrained
