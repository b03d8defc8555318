"""The toy-world learning-rate sweep: its objective, its choice, and its refusal before the pipeline ships."""

import sys
from pathlib import Path

import pytest

from svdiff_tools.toyworld import dreambooth

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import toyworld_lr_sweep as sweep  # noqa: E402


def _report(instance, recontext_both):
    return {"adapted": {"instance": {"identified": instance},
                        "recontext": {"identified": 1.0, "attribute": 1.0, "attribute_and_identified": recontext_both}},
            "base": {"instance": {"identified": 0.0}, "recontext": {"attribute_and_identified": 0.0}}}


def test_every_trainer_method_has_a_toy_world_default_and_a_place_in_the_sweep():
    from svdiff_tools.training.args import ALL_METHODS

    assert set(dreambooth.METHOD_DEFAULTS) == set(ALL_METHODS) == set(sweep.METHODS)
    for lr, steps, source in dreambooth.METHOD_DEFAULTS.values():
        assert 0 < lr < 1 and steps >= 1 and source


def test_score_is_the_mean_of_identification_and_recontextualisation():
    assert sweep.score(_report(0.75, 0.25)) == pytest.approx(0.5)
    assert sweep.score(_report(1.0, 1.0)) == 1.0 and sweep.score(_report(0.0, 0.0)) == 0.0


def test_choice_is_the_best_mean_over_seeds_and_ties_go_to_the_smaller_rate():
    assert sweep.choose({1e-3: [0.2, 0.4], 3e-3: [0.9, 0.1], 1e-2: [0.6, 0.6]}) == 1e-2
    assert sweep.choose({3e-3: [0.5], 1e-3: [0.5], 1e-2: [0.1]}) == 1e-3


@pytest.mark.skipif(dreambooth.available(), reason="the toy-world pipeline is shipped")
def test_refuses_in_one_sentence_before_the_pipeline_ships(capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--methods", "svfit", "--out", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "toy-world pipeline is not shipped yet" in err and "pretrain and export it first" in err
