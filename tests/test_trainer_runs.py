"""Issue 11, trainer items: a run owns its checkpoints; resumes and new runs never take another run's state."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from svdiff_tools.training import checkpoints

from test_trainer import _tiny_model_dir, launch  # noqa: F401  (the session fixture builds the tiny model)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dreambooth  # noqa: E402


def _ckpts(folder):
    return sorted(p.name for p in folder.glob("checkpoint-*"))


def test_a_second_run_never_takes_the_first_runs_checkpoints(tmp_path):
    """Item 1: run A leaves checkpoint-4/-8; run B in the same folder is refused unless it overwrites; B killed
    at step 7 resumes from its own checkpoint-6 (not A's -8), prunes only its own, and ends as B."""
    common = ["--method", "svfit", "--output_dir", "out", "--seed", "2", "--learning_rate", "1e-2"]
    a = launch(common + ["--max_train_steps", "12", "--checkpointing_steps", "4"], tmp_path, accelerate=False)
    assert a.returncode == 0, a.stderr[-2000:]
    out = tmp_path / "out"
    assert _ckpts(out) == ["checkpoint-4", "checkpoint-8"]
    a_final = (out / "svd_adapter.safetensors").read_bytes()

    b_args = common + ["--max_train_steps", "8", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
    refused = launch(b_args, tmp_path, accelerate=False)
    assert refused.returncode == 2
    assert "already holds a training run's results" in refused.stderr and "--overwrite_output_dir" in refused.stderr
    assert (out / "svd_adapter.safetensors").read_bytes() == a_final

    killed = launch(b_args + ["--overwrite_output_dir"], tmp_path, accelerate=False,
                    env={"SVDIFF_TOOLS_KILL_AFTER_STEP": "7"})
    assert killed.returncode != 0
    assert _ckpts(out) == ["checkpoint-4", "checkpoint-6"]  # A's are gone, B pruned only its own
    run = json.loads((out / checkpoints.RUN_FILE).read_text())
    assert all(json.loads((out / c / checkpoints.STATE_FILE).read_text())["run_id"] == run["run_id"]
               for c in _ckpts(out))

    other = launch(b_args + ["--resume_from_checkpoint", "latest", "--rank", "4"], tmp_path, accelerate=False)
    assert other.returncode == 2 and "another configuration (--rank" in other.stderr

    resumed = launch(b_args + ["--resume_from_checkpoint", "latest"], tmp_path, accelerate=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from out/checkpoint-6 at step 6" in resumed.stderr

    straight = launch(b_args + ["--output_dir", "b_straight"], tmp_path, accelerate=False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    got, want = (load_file(str(tmp_path / d / "svd_adapter.safetensors")) for d in ("out", "b_straight"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def _fake_checkpoint(folder, step, run_id, config, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": step, "run_id": run_id,
                                                           "config": config}))
    for name in ("adapter_state.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        if complete or name != "optimizer.bin":
            (path / name).write_bytes(b"x")
    return path


def test_resume_refuses_another_configuration_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """Item 1: the checkpoint records the run's flags; a resume with another --method stops in one sentence."""
    monkeypatch.chdir(tmp_path)
    args = train_dreambooth.parse_args(["--method", "svdiff", "--output_dir", "out"])
    _fake_checkpoint(tmp_path / "out", 3, "r", checkpoints.run_config(args))
    loaded = []
    monkeypatch.setattr("diffusers.UNet2DConditionModel.from_pretrained", lambda *a, **k: loaded.append(1))
    code = train_dreambooth.main(["--method", "svfit", "--output_dir", "out", "--resume_from_checkpoint",
                                  "checkpoint-3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--method: 'svdiff' in the checkpoint, 'svfit' now" in err
    assert not loaded


def test_an_incomplete_checkpoint_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """Item 11: a checkpoint folder without its optimizer state is named, not a FileNotFoundError later."""
    monkeypatch.chdir(tmp_path)
    args = train_dreambooth.parse_args(["--method", "svfit", "--output_dir", "out"])
    _fake_checkpoint(tmp_path / "out", 3, "r", checkpoints.run_config(args), complete=False)
    loaded = []
    monkeypatch.setattr("diffusers.UNet2DConditionModel.from_pretrained", lambda *a, **k: loaded.append(1))
    code = train_dreambooth.main(["--method", "svfit", "--output_dir", "out", "--resume_from_checkpoint",
                                  "checkpoint-3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a complete checkpoint (it lacks optimizer*.bin)" in err and not loaded


def test_a_fresh_run_cleans_what_a_killed_writer_left(tmp_path):
    """Item 12: temporary files of a kill during the final save (and half checkpoints) do not survive."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".svd_adapter.safetensors.abc123.tmp").write_bytes(b"half")
    (out / ".checkpoint-4.tmp").mkdir()
    plan = checkpoints.plan_run(out, {"method": "svfit"}, None, overwrite=False)
    checkpoints.start(out, plan)
    assert sorted(p.name for p in out.iterdir()) == [checkpoints.RUN_FILE]


def test_pruning_and_latest_see_only_this_runs_checkpoints(tmp_path):
    config = {"method": "svfit"}
    (tmp_path / checkpoints.RUN_FILE).write_text(json.dumps({"run_id": "mine", "config": config}))
    _fake_checkpoint(tmp_path, 8, "theirs", config)
    _fake_checkpoint(tmp_path, 2, "mine", config)
    assert checkpoints.plan_run(tmp_path, config, "latest", False).resume_path == tmp_path / "checkpoint-2"
    assert [s for s, _ in checkpoints.checkpoints(tmp_path, "mine")] == [2]
