"""The toy world's pretraining chain at a few steps: VAE stage, UNet stage with a resume, fp16 export that loads
with `DiffusionPipeline.from_pretrained`, and the quality gate, which must refuse untrained weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from svdiff_toyworld import assets, gate
from svdiff_toyworld import preset
from svdiff_toyworld.world import SUBJECTS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch_size", "2", "--log_every", "1", "--checkpoint_every", "1", "--warmup", "1"]


def _pretrain(out, *args):
    cmd = [sys.executable, "-m", "svdiff_toyworld.pretrain", *args, "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_pretraining_chain_at_a_few_steps(tmp_path):
    """One test, so that the few-step pipeline is built once whichever worker runs it."""
    built = pretrained(tmp_path / "toyworld")
    _stages_log_checkpoint_and_resume(built)
    _export_is_float16_on_disk_and_loads_as_float32(built)
    _the_gate_refuses_untrained_weights(built)
    for method in ("svfit", "full"):  # a spectral backend and the full one
        (tmp_path / method).mkdir()
        _the_main_job_runs_on_a_candidate_toy_world(built, tmp_path / method, method)


def pretrained(out):
    out.mkdir()
    vae_log = _pretrain(out, "vae", "--max_steps", "2", "--eval_every", "2", *SMALL)
    unet = ["unet", "--latent_cache", "8", "--eval_every", "100", "--eval_prompts", "2", *SMALL]
    first = _pretrain(out, *unet, "--max_steps", "2")
    second = _pretrain(out, *unet, "--max_steps", "3")
    pipeline = out / "pipeline"
    _pretrain(out, "export", "--to", str(pipeline))
    return out, pipeline, vae_log, first, second


def _stages_log_checkpoint_and_resume(pretrained):
    out, _, vae_log, first, second = pretrained
    records = [json.loads(line) for line in vae_log.splitlines() if line.startswith("{")]
    assert [r["step"] for r in records] == [1, 2] and "psnr" in records[-1]
    vae_config = json.loads((out / "vae" / "final" / "config.json").read_text())
    assert 0 < vae_config["scaling_factor"] < 100  # latents * factor have unit variance
    assert "resumed" not in first
    assert "resumed unet from" in second and "(step 2)" in second
    records = [json.loads(line) for line in second.splitlines() if line.startswith('{"step"')]
    assert [r["step"] for r in records] == [3]  # only the step after the checkpoint ran again
    assert "class" in records[-1]["gate"]  # the last step is evaluated with the metric network
    kept = sorted(p.name for p in (out / "unet").glob("checkpoint-*"))
    assert kept == ["checkpoint-2", "checkpoint-3"]  # --keep 2


def _export_is_float16_on_disk_and_loads_as_float32(pretrained):
    from diffusers import DiffusionPipeline

    _, pipeline, *_ = pretrained
    for part in ("unet", "vae"):
        with safe_open(str(pipeline / part / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    size = sum(p.stat().st_size for p in pipeline.rglob("*") if p.is_file())
    assert size <= 25 * 2**20


def _the_gate_refuses_untrained_weights(pretrained):
    from diffusers import DiffusionPipeline

    _, pipeline, *_ = pretrained
    pipe = DiffusionPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    result = gate.attribute_accuracy(pipe, n_prompts=16, seeds=(0,), steps=4)
    accuracy = result["accuracy"]
    assert {"class", "shape", "colour"} <= set(accuracy) and result["images"].shape == (16, 3, 64, 64)
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert not gate.passes(accuracy)



def _the_main_job_runs_on_a_candidate_toy_world(pretrained, tmp_path, method):
    """The no-flag main job on a toy-world pipeline (here the few-step candidate, through the override variable):
    toy-world defaults, the shipped subject with prior preservation, and the measured report in the card."""
    from svdiff_toyworld.assets import PIPELINE_ENV

    _, pipeline, *_ = pretrained
    out = tmp_path / "out"
    env = dict(os.environ, **{PIPELINE_ENV: str(pipeline), "XDG_CACHE_HOME": str(tmp_path / "cache")})
    env.pop("SVDIFF_TOOLS_EMBEDDED", None)
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--method", method, "--max_train_steps", "2",
           "--num_class_images", "2", "--num_validation_images", "2", "--num_inference_steps", "2",
           "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "toyworld_report.json").read_text())
    assert {"adapted", "base"} <= set(report)
    for label in ("adapted", "base"):
        assert 0.0 <= report[label]["instance"]["identified"] <= 1.0
        assert "attribute_and_identified" in report[label]["recontext"]
    card = (out / "README.md").read_text()
    assert "pipeline_path()" in card and "identified" in card.lower()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]  # the card's usage code, run as written
    ran = subprocess.run([sys.executable, "-c", snippet + "\nprint(image.size)"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert ran.returncode == 0 and ran.stdout.strip().endswith("(64, 64)"), ran.stderr[-3000:]
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 2  # class images made by the candidate, cached


@pytest.mark.skipif(not preset.available(), reason="the pretrained toy-world pipeline is not shipped yet")
def test_the_shipped_pipeline_loads_offline_and_holds_its_gate_on_a_sample():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(assets.pipeline_path(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    accuracy = gate.attribute_accuracy(pipe, n_prompts=16, seeds=(0,), steps=20)["accuracy"]
    assert all(accuracy[a] >= 0.75 for a in ("class", "shape", "colour", "background")), accuracy


@pytest.mark.skipif(not preset.available(), reason="the pretrained toy-world pipeline is not shipped yet")
def test_a_users_own_subject_gets_the_recipe_and_its_report_identifies_it(tmp_path):
    """Issue 33's done-when: a held-out subject no default was tuned on, written to a folder as a user would have it,
    trained with only --instance_data_dir and --instance_prompt. The run applies the main job's recipe (prior
    preservation with the class prompt derived from the prompt, the recontextualisation validation prompt) and its
    report, reading the subject from the folder, identifies it far more often than the base on the same seeds; the
    card carries the report, the training crops and the loss curve."""
    from svdiff_toyworld.world import HELD_OUT_SUBJECTS, TEST_SUBJECTS

    subject = HELD_OUT_SUBJECTS["yellow_robot"]
    assert subject.name in TEST_SUBJECTS
    views = tmp_path / "my_robot"
    assets.write_subject_images(subject, views)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("SVDIFF_TOOLS_EMBEDDED", None)
    env.pop(assets.PIPELINE_ENV, None)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--instance_data_dir", str(views), "--instance_prompt",
           "a photo of sks robot", "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "subject: identifier 'sks', class 'robot'" in log
    assert "prior preservation: on, 32 class images of 'a photo of a robot'" in log
    assert "validation prompts: 'a photo of sks robot'; 'a sks robot on a green background'" in log
    assert len(list((tmp_path / "cache").rglob("class_*.png"))) == 32
    report = json.loads((out / "toyworld_report.json").read_text())
    assert report["subject"].startswith("a yellow dotted cross robot")
    adapted, base = report["adapted"], report["base"]
    assert adapted["instance"]["images"] == 16 and adapted["recontext"]["prompt"] == "a sks robot on a green background"
    assert adapted["instance"]["identified"] >= 0.5 and adapted["recontext"]["identified"] >= 0.5, report
    assert base["instance"]["identified"] <= 0.1 and base["recontext"]["identified"] <= 0.1, report
    card = (out / "README.md").read_text()
    assert "Subject as the metric network reads its images: a yellow dotted cross robot" in card
    assert "training_crops.png" in card and "loss.png" in card and "## Recipe" in card
    assert (out / "loss.png").is_file() and len((out / "loss.csv").read_text().splitlines()) == 600


@pytest.mark.skipif(not preset.available(), reason="the pretrained toy-world pipeline is not shipped yet")
def test_the_base_scores_are_measured_once_per_pipeline_version(tmp_path):
    """The main job's report reads the base pipeline's scores from a cache after the first run: the same numbers
    as measuring again, and the base pipeline is not even loaded."""
    from diffusers import StableDiffusionPipeline

    from svdiff_toyworld import evaluate, metric

    net, loads = metric.load(), []

    def load_base():
        loads.append(1)
        return StableDiffusionPipeline.from_pretrained(assets.pipeline_path(), safety_checker=None,
                                                       requires_safety_checker=False)

    adapted = load_base()  # no adapter: "adapted" and "base" must then read the same
    cache = tmp_path / "base.json"
    kwargs = dict(seeds=range(2), steps=3, guidance=5.0, net=net, base_cache=cache)
    first = evaluate.dreambooth_report(adapted, load_base, preset.SUBJECT, **kwargs)
    assert len(loads) == 2 and cache.is_file() and first["adapted"] == first["base"]
    written = cache.stat().st_mtime_ns
    again = evaluate.dreambooth_report(adapted, load_base, preset.SUBJECT, **kwargs)
    assert len(loads) == 2 and again == first and cache.stat().st_mtime_ns == written  # all hits: not rewritten
    other_seeds = evaluate.dreambooth_report(adapted, load_base, preset.SUBJECT, **dict(kwargs, seeds=[5]))
    assert len(loads) == 3 and len(json.loads(cache.read_text())) == 4  # 2 prompts x 2 seed sets
    cache.write_text("{not json")  # a damaged cache is measured again, not trusted
    assert evaluate.dreambooth_report(adapted, load_base, preset.SUBJECT, **kwargs) == first and len(loads) == 4
    assert other_seeds["base"]["instance"]["prompt"] == preset.SUBJECT.instance_prompt


@pytest.mark.skipif(not preset.available(), reason="the pretrained toy-world pipeline is not shipped yet")
def test_the_evaluate_command_reads_an_adapter_on_other_seeds(tmp_path, monkeypatch, capsys):
    """An adapter at its identity (svdiff at init) must read exactly as the base on every prompt."""
    from diffusers import UNet2DConditionModel

    import svdiff_tools as st
    from svdiff_toyworld import evaluate, measure

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    unet = UNet2DConditionModel.from_pretrained(assets.pipeline_path(), subfolder="unet")
    st.inject_adapter(unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet-attention"))
    st.save_adapter(unet, tmp_path / "svd_adapter.safetensors")
    measure.main([str(tmp_path), "--first_seed", "7", "--num_images", "2", "--num_inference_steps", "3",
                   "--subject", "example_robot"])  # any shipped subject: its prompts and its renders
    out = capsys.readouterr().out
    assert out.startswith(f"## {tmp_path}: seeds 7-8\n")
    rows = {tuple(cells[:2]): cells[2:] for cells in
            ([c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()[3:])}
    assert len(rows) == 4
    robot = SUBJECTS["example_robot"]
    for prompt in (robot.instance_prompt, evaluate.recontext_prompt(robot)):
        assert rows[("adapted", f"`{prompt}`")] == rows[("base", f"`{prompt}`")]
