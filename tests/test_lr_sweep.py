"""The toy-world learning-rate sweep: its objective, its choice, and its refusal before the pipeline ships."""

import sys
from pathlib import Path

import pytest

from svdiff_toyworld import preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import toyworld_lr_sweep as sweep  # noqa: E402


def _report(instance, recontext_both):
    return {"adapted": {"instance": {"identified": instance},
                        "recontext": {"identified": 1.0, "attribute": 1.0, "attribute_and_identified": recontext_both}},
            "base": {"instance": {"identified": 0.0}, "recontext": {"attribute_and_identified": 0.0}}}


def test_every_trainer_method_has_a_toy_world_default_and_a_place_in_the_sweep():
    from svdiff_trainer.args import ALL_METHODS

    assert set(preset.METHOD_DEFAULTS) == set(ALL_METHODS) == set(sweep.METHODS)
    for d in preset.METHOD_DEFAULTS.values():
        assert 0 < d.learning_rate < 1 and d.steps >= 1 and d.source and (d.rank is None or d.rank > 0)


def test_score_is_the_mean_of_identification_and_recontextualisation():
    assert sweep.score(_report(0.75, 0.25)) == pytest.approx(0.5)
    assert sweep.score(_report(1.0, 1.0)) == 1.0 and sweep.score(_report(0.0, 0.0)) == 0.0


def test_choice_is_the_best_mean_over_seeds_and_ties_go_to_the_smaller_rate():
    assert sweep.choose({1e-3: [0.2, 0.4], 3e-3: [0.9, 0.1], 1e-2: [0.6, 0.6]}) == 1e-2
    assert sweep.choose({3e-3: [0.5], 1e-3: [0.5], 1e-2: [0.1]}) == 1e-3


def test_refuses_in_one_sentence_without_the_pipeline(capsys, monkeypatch, tmp_path):
    from svdiff_toyworld.assets import PIPELINE_ENV

    monkeypatch.setenv(PIPELINE_ENV, str(tmp_path / "no-pipeline-here"))
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--methods", "svfit", "--out", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no toy-world pipeline at" in err and "no-pipeline-here" in err and "pretrain and export it first" in err
