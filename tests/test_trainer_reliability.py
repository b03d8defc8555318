"""Issue 31, the trainer's and the tools' items: class images checked against what made them (3), captions that
name another identifier (4), one run per output folder (5), full disks under the SVD cache and under checkpoints
(6, 7), and one sentence instead of a traceback for the inputs item 9 lists."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import svdiff_tools as st
from svdiff_trainer import checkpoints

from test_trainer import _tiny_model_dir, launch  # noqa: F401  (the session fixture builds the tiny model)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dreambooth  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a tmpfs of a given size in KiB (root only; skipped where mounting is not allowed)."""
    mounted = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()[:80]})")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> None:
    """Write until the disk under ``folder`` is full."""
    (folder / "svd").mkdir()  # the cache folder exists; only its data cannot be written
    try:
        with open(folder / "filler", "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
    except OSError:
        pass


def _in_process(monkeypatch, tmp_path, capsys, argv):
    """train_dreambooth.main in this process with model loading forbidden: (exit code, stderr, loads)."""
    monkeypatch.chdir(tmp_path)
    loaded = []
    monkeypatch.setattr("diffusers.UNet2DConditionModel.from_pretrained", lambda *a, **k: loaded.append(1))
    code = train_dreambooth.main(argv)
    return code, capsys.readouterr().err.strip(), loaded


# ------------------------------------------------------------------------------------------ item 3
def _class_folder(tmp_path, made_by=None, raw=None):
    folder = tmp_path / "class"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "class_00000.png")
    if made_by is not None or raw is not None:
        (folder / ".class_images.json").write_text(raw if raw is not None else json.dumps({"made_by": made_by}))
    return folder


PRIOR = ["--with_prior_preservation", "--class_data_dir", "class", "--class_prompt", "a photo of a toy",
         "--num_class_images", "2", "--output_dir", "out"]


@pytest.mark.parametrize("field,value", [("prompt", "a photo of a car"), ("resolution", 64),
                                         ("weights", "0" * 24), ("revision", "v2")])
def test_class_images_made_for_another_base_prompt_or_resolution_are_refused(tmp_path, monkeypatch, capsys,
                                                                              field, value):
    """Item 3: the record beside the class images must name this run's base, revision, variant, prompt and
    resolution; a mismatch is refused before any model loads."""
    from svdiff_trainer.args import parse_args
    from svdiff_trainer.base_model import resolve_base
    from svdiff_trainer.validation import class_images_made_by

    monkeypatch.chdir(tmp_path)
    args = parse_args(PRIOR)
    made_by = dict(class_images_made_by(args, resolve_base(args.model), "a photo of a toy"), **{field: value})
    _class_folder(tmp_path, made_by)
    code, err, loaded = _in_process(monkeypatch, tmp_path, capsys, PRIOR)
    assert code == 2 and "\n" not in err and not loaded, err
    assert f"holds class images made with another {field}" in err
    assert "pass another --class_data_dir" in err and not (tmp_path / "out").exists()


def test_class_images_follow_their_base_by_weights_not_by_path(tmp_path, caplog):
    """The record identifies a local base by a digest of its files: a moved or copied folder (a package upgrade
    moves the embedded one) is the same base, a folder whose files changed is not; a record from before the
    digests whose folder is gone is used with one warning, one that names another existing folder is refused."""
    import shutil

    from svdiff_trainer.args import TrainingInputError, parse_args
    from svdiff_trainer.base_model import resolve_base
    from svdiff_trainer.validation import check_class_images, class_images_made_by

    args = parse_args(PRIOR)
    base = Path(resolve_base(args.model))
    made_by = class_images_made_by(args, str(base), "a photo of a toy")
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    at_new_place = class_images_made_by(args, str(moved), "a photo of a toy")
    assert at_new_place["base"] != made_by["base"] and at_new_place["weights"] == made_by["weights"]
    check_class_images(_class_folder(tmp_path / "a", made_by), at_new_place)  # accepted, silently
    (moved / "unet" / "config.json").write_text((moved / "unet" / "config.json").read_text() + " ")
    changed = class_images_made_by(args, str(moved), "a photo of a toy")
    with pytest.raises(TrainingInputError, match="made with another weights"):
        check_class_images(_class_folder(tmp_path / "b", at_new_place), changed)
    old_record = {k: v for k, v in made_by.items() if k != "weights"}
    with caplog.at_level(logging.WARNING):
        check_class_images(_class_folder(tmp_path / "c", dict(old_record, base="/gone/svdiff_tools/data/x")), made_by)
    assert "names a base folder that no longer exists" in caplog.text
    with pytest.raises(TrainingInputError, match="made with another base"):
        check_class_images(_class_folder(tmp_path / "d", dict(old_record, base=str(tmp_path))), made_by)


def test_an_unreadable_class_image_record_is_refused(tmp_path, monkeypatch, capsys):
    _class_folder(tmp_path, raw="{edited")
    code, err, loaded = _in_process(monkeypatch, tmp_path, capsys, PRIOR)
    assert code == 2 and not loaded and ".class_images.json (what made the class images" in err


def test_class_images_without_a_record_are_used_with_one_warning(tmp_path, caplog):
    from svdiff_trainer.validation import check_class_images

    folder = _class_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        check_class_images(folder, {"base": "b", "revision": None, "variant": None, "prompt": "a photo of a toy",
                                    "resolution": 32})
    assert "1 class images in" in caplog.text and "carry no record of what made them" in caplog.text


def test_generated_class_images_are_recorded_and_reused(tmp_path):
    """Item 3: a real run records what made its class images; a second run with the same settings reuses them and
    one with another class prompt is refused."""
    first = launch(PRIOR + ["--max_train_steps", "1"], tmp_path, accelerate=False)
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((tmp_path / "class" / ".class_images.json").read_text())["made_by"]
    assert record["prompt"] == "a photo of a toy" and record["resolution"] == 32
    assert Path(record["base"]).is_dir()
    images = sorted(p.name for p in (tmp_path / "class").glob("*.png"))
    again = launch(PRIOR + ["--max_train_steps", "1", "--output_dir", "out2"], tmp_path, accelerate=False)
    assert again.returncode == 0 and sorted(p.name for p in (tmp_path / "class").glob("*.png")) == images
    other = launch(PRIOR + ["--class_prompt", "a photo of a car", "--output_dir", "out3"], tmp_path,
                   accelerate=False)
    assert other.returncode == 2 and "made with another prompt" in other.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize("prompt,class_prompt,identifier", [
    ("a photo of sks dog", "a photo of a dog", "sks"), ("a photo of sks toy", None, "sks"),
    ("a photo of zwx car", "a photo of a car", "zwx"), ("a photo of a dog", None, None),
])
def test_the_identifier_is_read_from_the_prompt(prompt, class_prompt, identifier):
    from svdiff_trainer.recipe import read_subject

    assert (read_subject(prompt, class_prompt) or (None,))[0] == identifier


def test_captions_that_name_another_identifier_are_warned_about_once(tmp_path, caplog):
    """Item 4: a ``zwx`` caption in a ``sks`` run trains the subject under another word: one warning names it."""
    from svdiff_trainer.data import warn_captions_without

    for name, caption in (("a", "a photo of sks dog on grass"), ("b", "a photo of zwx dog"), ("c", None),
                          ("d", "a photo of a dog")):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        if caption:
            (tmp_path / f"{name}.txt").write_text(caption)
    with caplog.at_level(logging.WARNING):
        warn_captions_without(tmp_path, ".txt", "sks")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 caption file(s)" in warnings[0]
    assert "b.txt: 'a photo of zwx dog'" in warnings[0] and "d.txt" in warnings[0] and "a.txt" not in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_captions_without(tmp_path, ".txt", None)  # no identifier known: nothing to check
    assert not caplog.records


def test_a_run_warns_about_a_foreign_caption(tmp_path):
    data = tmp_path / "dog"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 10)).save(data / f"{i}.png")
    (data / "1.txt").write_text("a photo of zwx dog")
    result = launch(["--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog", "--max_train_steps",
                     "1", "--output_dir", "out"], tmp_path, accelerate=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("do not name the identifier 'sks'") == 1 and "1.txt" in result.stderr


# ------------------------------------------------------------------------------------------ item 5
def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    """Item 5: while a run holds --output_dir, a second run there is refused in one sentence with its PID."""
    out = tmp_path / "out"
    with checkpoints.output_lock(out):
        refused = launch(["--max_train_steps", "1", "--output_dir", "out", "--resume_from_checkpoint", "latest"],
                         tmp_path, accelerate=False)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last == (f"error: out is in use by another training run (PID {os.getpid()}); wait for it to finish or "
                    "choose another --output_dir.")
    assert not (out / checkpoints.RUN_FILE).exists()


def test_two_concurrent_runs_on_one_folder(tmp_path):
    """Item 5, end to end: run A trains; run B, started on the same folder meanwhile, is refused naming A's PID;
    A finishes untouched. A dead holder's lock is then taken over by the next run."""
    env = dict(os.environ, SVDIFF_TOOLS_EMBEDDED="tiny")
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--max_train_steps", "40", "--checkpointing_steps",
           "10", "--output_dir", "out", "--resume_from_checkpoint", "latest"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / checkpoints.LOCK_FILE
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.2)
    second = launch(cmd[2:], tmp_path, accelerate=False)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and f"in use by another training run (PID {first.pid})" in second.stderr
    lock.write_text("999999999\n")  # a holder that no longer runs (its kernel lock died with it)
    third = launch(["--max_train_steps", "1", "--output_dir", "out", "--overwrite_output_dir"], tmp_path,
                   accelerate=False)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "from PID 999999999, which no longer runs" in third.stderr


def test_a_run_refused_after_taking_the_lock_leaves_no_folder_behind(tmp_path, monkeypatch, capsys):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, err, loaded = _in_process(monkeypatch, tmp_path, capsys, ["--instance_data_dir", "corrupt",
                                                                    "--instance_prompt", "x", "--output_dir", "new"])
    assert code == 2 and "bad.png cannot be read" in err and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ items 6, 7
def test_a_full_disk_under_the_svd_cache_only_costs_speed(small_disk, monkeypatch, caplog):
    """Item 6: safetensors' own error on a full disk is not an OSError; injection still succeeds, with one
    warning, and the model is the exact base model at init."""
    from svdiff_tools import cache

    disk = small_disk(64)
    _fill(disk)
    monkeypatch.setenv("SVDIFF_TOOLS_CACHE", str(disk / "svd"))
    monkeypatch.setattr(cache, "_warned_unwritable", set())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.Linear(80, 64))
    x = torch.randn(3, 96)
    before = model(x)
    with caplog.at_level(logging.WARNING, logger="svdiff_tools.cache"):
        st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules=["0", "1"], svd_driver="full"))
    warnings = [r.getMessage() for r in caplog.records if "could not write SVD cache entries" in r.getMessage()]
    assert len(warnings) == 1
    assert torch.equal(model(x), before)
    assert not list((disk / "svd").glob("*.safetensors"))


def test_a_full_disk_while_checkpointing_names_the_last_good_checkpoint(small_disk, tmp_path):
    """Item 7: one checkpoint fits, the second does not: one sentence says so and names the first, which is
    complete and resumable; no temporary folder is left."""
    disk = small_disk(200)
    result = launch(["--max_train_steps", "3", "--checkpointing_steps", "1", "--output_dir", str(disk / "out")],
                    tmp_path, accelerate=False)
    assert result.returncode == 4, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: no space left on the device writing checkpoint-2 in {disk / 'out'}; the last good "
                    "checkpoint is checkpoint-1: free space (or fix the folder) and rerun with "
                    "--resume_from_checkpoint latest.")
    assert checkpoints.incomplete_reason(disk / "out" / "checkpoint-1") is None
    assert not list((disk / "out").glob(".checkpoint-*"))


# ------------------------------------------------------------------------------------------ item 9
@pytest.mark.parametrize("target", ["dangling", "loop", "loop/sub"])
def test_a_broken_symlink_as_output_dir_is_one_sentence(tmp_path, monkeypatch, capsys, target):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code, err, loaded = _in_process(monkeypatch, tmp_path, capsys, ["--output_dir", target])
    assert code == 2 and "\n" not in err and not loaded
    assert "a symbolic link to a missing folder or a loop of links" in err


@pytest.mark.parametrize("content", ["{not json", "[]", '{"run_id": 5}'])
def test_a_tampered_run_json_is_one_sentence(tmp_path, monkeypatch, capsys, content):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(content)
    code, err, loaded = _in_process(monkeypatch, tmp_path, capsys, ["--output_dir", "out", "--resume_from_checkpoint",
                                                                    "latest"])
    assert code == 2 and not loaded and "run.json (which run owns this folder) is unreadable" in err
    assert (tmp_path / "out" / "run.json").read_text() == content


@pytest.mark.parametrize("rank", ["nan", "inf", "1e9", "abc", "-1", "1.5"])
def test_export_rank_flags_are_one_sentence(rank, capsys):
    """Both parsers (pipelines/export.py --rank, the trainer's --export_lora_rank) in this process."""
    from pipelines import export

    for parse, argv in ((export.parse_args, ["--adapter", "a", "--lora", "l.safetensors", f"--rank={rank}"]),
                        (train_dreambooth.parse_args, [f"--export_lora_rank={rank}"])):
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert f"'{rank}' is not a LoRA rank: give 0 (exact), a positive int" in err.strip().splitlines()[-1]


def test_export_rank_flag_ends_both_commands_in_one_sentence(tmp_path):
    for cmd in ([sys.executable, str(ROOT / "pipelines" / "export.py"), "--adapter", "a", "--lora", "l.safetensors",
                 "--rank=nan"],
                [sys.executable, str(ROOT / "train_dreambooth.py"), "--export_lora_rank=nan"]):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "'nan' is not a LoRA rank: give 0 (exact), a positive int" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flags,match", [
    (["--method", "nope"], "method='nope' is not supported"),
    (["--rank", "nan", "--method", "svfit"], "rank=nan"),
    (["--rank", "-1", "--method", "svfit"], "must lie in \\(0, 1\\)"),
    (["--rank", "1000000", "--method", "svfit"], "rank 1000000 exceeds min\\(out, in\\)"),
    (["--target_modules", "nothing_here"], "matched no Linear/Conv/Embedding module"),
    (["--svft_offset", "-3", "--method", "svft"], "svft_offset=-3"),
    (["--basis_storage", "x"], "basis_storage='x' is not supported"),
    (["--config", "missing.json"], "--config missing.json does not exist"),
    (["--config", "bad.json"], "--config bad.json is not readable JSON"),
    (["--config", "foreign.json"], "describes a model \\('nope'\\) that neither transformers nor diffusers"),
    (["--config", "list.json"], "holds no JSON object"),
])
def test_the_estimator_cli_answers_bad_flags_in_one_sentence(tmp_path, monkeypatch, capsys, flags, match):
    import re

    from transformers import BertConfig

    from svdiff_tools.estimate import main

    monkeypatch.chdir(tmp_path)
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).to_json_file(
        "bert.json")
    Path("bad.json").write_text("{not json")
    Path("foreign.json").write_text('{"model_type": "nope"}')
    Path("list.json").write_text("[1, 2]")
    argv = flags if "--config" in flags else ["--config", "bert.json"] + flags
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err


@pytest.mark.parametrize("flags,match", [
    (["missing.png"], "image missing.png cannot be read"),
    (["notes.png"], "image notes.png cannot be read"),
    (["bomb.png"], "declares more than"),
    (["ok.png", "--steps", "0"], "--steps 0 must be at least 1"),
    (["ok.png", "--inference_steps", "-2"], "--inference_steps -2 must be at least 1"),
    (["ok.png", "--lr", "nan"], "--lr nan must be a positive number"),
    (["ok.png", "--guidance", "inf"], "--guidance inf must be a finite number"),
    (["ok.png", "--out", "afile"], "--out afile is a file"),
    (["ok.png", "--base", "no/such/model"], "--base no/such/model cannot be loaded as a diffusers pipeline"),
])
def test_edit_answers_bad_inputs_in_one_sentence(tmp_path, flags, match):
    from test_trainer import _png_declaring

    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(_png_declaring(20000, 20000))
    (tmp_path / "afile").write_text("x")
    cmd = [sys.executable, str(ROOT / "pipelines" / "edit.py")] + flags + ["--prompt", "p", "--edit", "e"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert match in done.stderr.strip().splitlines()[-1], done.stderr[-500:]
