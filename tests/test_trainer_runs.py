"""Issue 11, trainer items: a run owns its checkpoints; resumes and new runs never take another run's state."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svdiff_trainer import checkpoints

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


def test_class_images_appear_only_when_complete(tmp_path, monkeypatch):
    """An interrupted class-image run leaves no truncated PNG for the next run to count and fail on; the next one
    tops the folder up to whole, readable images."""
    from types import SimpleNamespace

    from PIL import Image

    from svdiff_trainer.args import list_images
    from svdiff_trainer.config import RunConfig
    from svdiff_trainer.validation import generate_class_images

    class Pipe:
        def __call__(self, prompts, generator=None, **_):
            g = torch.Generator().manual_seed(generator.initial_seed())
            return SimpleNamespace(images=[Image.fromarray(torch.randint(0, 255, (8, 8, 3), generator=g,
                                                                         dtype=torch.uint8).numpy())
                                           for _ in prompts])

        def set_progress_bar_config(self, **_):
            pass

        def to(self, device):
            return self

    args = RunConfig.from_flags(dict(num_class_images=3, prior_generation_precision="fp32", sample_batch_size=1,
                                     seed=0, num_inference_steps=1, guidance_scale=1.0, resolution=8))
    accelerator = SimpleNamespace(device="cpu", is_local_main_process=False)
    save, saved = Image.Image.save, []

    def dies_while_writing_the_second(self, fp, *a, **k):
        if len(saved) == 1:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")  # the first bytes, then the kill
            raise KeyboardInterrupt
        saved.append(fp)
        return save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", dies_while_writing_the_second)
    made_by = {"base": "tiny", "prompt": "a toy", "resolution": 8}
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(args, lambda **_: Pipe(), accelerator, torch.float32, tmp_path, "a toy", made_by)
    # the whole one and the record of what made it; nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == [".class_images.json", "class_00000.png"]
    monkeypatch.setattr(Image.Image, "save", save)
    generate_class_images(args, lambda **_: Pipe(), accelerator, torch.float32, tmp_path, "a toy", made_by)
    images = list_images(tmp_path)
    assert [p.name for p in images] == [f"class_{i:05d}.png" for i in range(3)]
    assert all(Image.open(p).convert("RGB").size == (8, 8) for p in images)
