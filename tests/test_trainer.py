"""train_dreambooth.py on the embedded tiny model: every method, outputs, resume after SIGKILL, DDP, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import svdiff_tools.diffusers  # noqa: F401  (pipe.load_svd_adapter)
from svdiff_trainer.tiny import tiny_pipeline_path
from svdiff_trainer.args import EXAMPLE_DATA
from svdiff_trainer.config import RunConfig
from svdiff_trainer.data import open_rgb

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_dreambooth.py")
TOY_SUBJECTS = ROOT / "toyworld" / "svdiff_toyworld" / "data" / "subjects"
sys.path.insert(0, str(ROOT))
import train_dreambooth  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_dir(tmp_path_factory):
    os.environ["SVDIFF_TOOLS_TINY_DIR"] = str(tmp_path_factory.mktemp("tiny_models"))
    os.environ["SVDIFF_TOOLS_EMBEDDED"] = "tiny"  # in-process runs too
    tiny_pipeline_path("sd15")  # built once per worker, then loaded with from_pretrained like a hub model


def launch(args, cwd, accelerate=True, env=None, processes=1):
    # through this interpreter: an unactivated virtual environment has no `accelerate` on PATH
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no"]
    if processes > 1:
        import socket

        with socket.socket() as sock:  # a free port: the default 29500 may be taken on a busy machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(port)]
    else:
        launcher += ["--num_processes", "1"]
    cmd = (launcher if accelerate else [sys.executable]) + [SCRIPT] + args
    env = {"SVDIFF_TOOLS_EMBEDDED": "tiny", **(env or {})}  # the fast tiny model unless a test asks otherwise
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=dict(os.environ, **env))


def render(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks toy", num_inference_steps=4, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def base_pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_path("sd15")), safety_checker=None)


def test_readme_main_job(tmp_path):
    result = launch(["--method", "svfit"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "svd-dreambooth-model"
    assert {"svd_adapter.safetensors", "README.md", "grid.png", "validation"} <= {p.name for p in out.iterdir()}
    assert "done: svd-dreambooth-model/svd_adapter.safetensors" in result.stdout
    card = (out / "README.md").read_text()
    assert "method: `svfit`" in card and "trainable parameters" in card and "grid.png" in card
    assert "- captions: 5 caption files, used on every step" in card  # the shipped views' sidecar captions
    pipe = base_pipe()
    before = render(pipe)
    pipe.load_svd_adapter(out)
    assert np.abs(render(pipe) - before).max() > 1e-4
    assert not any(p.name.startswith(".checkpoint") for p in out.iterdir())


@pytest.mark.parametrize("method_args", [
    ["--method", "svdiff", "--train_norms"],
    ["--method", "svft", "--svft_pattern", "banded", "--svft_offset", "1", "--export_lora_rank", "0",
     "--basis_storage", "one_sided"],
    ["--method", "vectorfit", "--avf_k", "2", "--avf_interval", "2"],
    ["--method", "lora", "--rank", "2"],
    ["--method", "pissa", "--rank", "2"],
    ["--method", "full", "--learning_rate", "1e-3"],
], ids=lambda a: a[1])
def test_every_method_trains_and_reloads(tmp_path, method_args):
    lr = [] if "--learning_rate" in method_args else ["--learning_rate", "5e-2"]
    result = launch(method_args + lr + ["--max_train_steps", "3", "--output_dir", "out", "--seed", "1"], tmp_path,
                    accelerate=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    pipe = base_pipe()
    before = render(pipe)
    if method_args[1] in ("lora", "pissa"):
        pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    elif method_args[1] == "full":
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(out / "unet")
    else:
        pipe.load_svd_adapter(out / "svd_adapter.safetensors")
    assert np.abs(render(pipe) - before).max() > 1e-4
    if "--export_lora_rank" in method_args:
        lora = base_pipe()
        lora.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
        np.testing.assert_allclose(render(lora), render(pipe), atol=2e-5)


def test_text_encoder_training_and_prior_preservation(tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(class_dir / "mine.png")
    before = (class_dir / "mine.png").read_bytes()
    result = launch(["--method", "svdiff", "--train_text_encoder", "--with_prior_preservation", "--class_prompt",
                     "a photo of a toy", "--class_data_dir", str(class_dir), "--num_class_images", "3",
                     "--max_train_steps", "2", "--output_dir", "out"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(class_dir.glob("*.png"))) == 3 and (class_dir / "mine.png").read_bytes() == before
    tensors = load_file(str(tmp_path / "out" / "svd_adapter.safetensors"))
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)


def test_peft_lora_trains_the_text_encoder_and_diffusers_reloads_it(tmp_path):
    """--method lora --train_text_encoder: LoRA layers on the text encoder through PEFT (transformers' own
    `add_adapter` refuses the PEFT on PyPI), saved in diffusers' layout, reloaded by `load_lora_weights`."""
    result = launch(["--method", "lora", "--rank", "2", "--train_text_encoder", "--learning_rate", "1e-2",
                     "--max_train_steps", "3", "--output_dir", "out"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    te = {k: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    assert te and any(k.startswith("unet.") for k in tensors)
    assert any(v.abs().max() > 0 for k, v in te.items() if "lora_B" in k)  # trained away from its zero init
    pipe = base_pipe()
    ids = pipe.tokenizer(["a photo of sks toy"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors")
        after = pipe.text_encoder(ids)[0]
    assert (after - before).abs().max() > 1e-5


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    common = ["--method", "vectorfit", "--avf_k", "2", "--avf_interval", "2", "--max_train_steps", "6",
              "--checkpointing_steps", "3", "--seed", "3", "--random_flip", "--gradient_accumulation_steps", "2"]
    straight = launch(common + ["--output_dir", "a"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(common + ["--output_dir", "b"], tmp_path, env={"SVDIFF_TOOLS_KILL_AFTER_STEP": "4"})
    assert killed.returncode != 0
    assert [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-3"]
    assert not (tmp_path / "b" / "svd_adapter.safetensors").exists()
    resumed = launch(common + ["--output_dir", "b", "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from b/checkpoint-3 at step 3" in resumed.stderr
    a, b = (load_file(str(tmp_path / d / "svd_adapter.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    from svdiff_trainer import checkpoints

    config = {"method": "svfit"}
    (tmp_path / checkpoints.RUN_FILE).write_text('{"run_id": "r1", "config": {"method": "svfit"}}')
    for step in (2, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / checkpoints.STATE_FILE).write_text(f'{{"global_step": {step}, "run_id": "r1"}}')
        for name in ("adapter_state.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            (folder / name).write_bytes(b"x")
    (tmp_path / "checkpoint-8" / "optimizer.bin").unlink()  # incomplete (an older version's half write)
    (tmp_path / ".checkpoint-4.tmp").mkdir()  # a kill during the write of checkpoint 4
    (tmp_path / "checkpoint-6").mkdir()  # a folder without state (not ours): ignored
    plan = checkpoints.plan_run(tmp_path, config, "latest", overwrite=False)
    assert plan.resume_path == tmp_path / "checkpoint-2" and plan.run_id == "r1"


def test_two_processes(tmp_path):
    result = launch(["--method", "svfit", "--max_train_steps", "2", "--checkpointing_steps", "1",
                     "--output_dir", "out"], tmp_path, processes=2)
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "rror" in line][:10]
    assert "svfit on 2 process(es)" in result.stderr
    assert (tmp_path / "out" / "svd_adapter.safetensors").is_file() and (tmp_path / "out" / "checkpoint-1").is_dir()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = launch(["--method", "svdiff", "--learning_rate", "1e30", "--max_train_steps", "8",
                     "--checkpointing_steps", "1", "--output_dir", "out"], tmp_path, accelerate=False)
    assert result.returncode == 3, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the ") and "lower --learning_rate" in err and "last good checkpoint" in err
    out = tmp_path / "out"
    assert not (out / "svd_adapter.safetensors").exists()
    for ckpt in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "adapter_state.safetensors")).values())


@pytest.mark.parametrize("extra,match", [
    (["--instance_data_dir", "missing", "--instance_prompt", "x"], "does not exist"),
    (["--instance_data_dir", "empty", "--instance_prompt", "x"], "holds no images"),
    (["--instance_data_dir", "corrupt", "--instance_prompt", "x"], "image corrupt/bad.png cannot be read"),
    (["--instance_data_dir", "empty"], "--instance_prompt is required"),
    (["--resolution", "30"], "--resolution 30 must be a positive multiple of 8"),
    (["--with_prior_preservation", "--class_data_dir", "c", "--instance_prompt", "sks"], "needs --class_prompt"),
    (["--target_modules", "to_qq"], "matched no .*nearest names: .*to_q"),
    (["--method", "svfit", "--rank", "999"], "rank 999 exceeds min"),
    (["--method", "svdiff", "--avf_k", "2"], "belongs to method='vectorfit'"),
    (["--resume_from_checkpoint", "checkpoint-7"], "does not exist; pass a checkpoint-N folder or 'latest'"),
    (["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a toy", "--num_class_images", "0"],
     "needs --num_class_images of at least 1"),
    (["--instance_data_dir", "bomb", "--instance_prompt", "x"], "image bomb/huge.png declares more than"),
    (["--instance_data_dir", "blank_caption", "--instance_prompt", "x"], "caption file blank_caption/a.txt is empty"),
    (["--instance_data_dir", "latin1_caption", "--instance_prompt", "x"],
     "caption file latin1_caption/a.txt cannot be read .UnicodeDecodeError.; save it as UTF-8"),
    (["--caption_probability", "1.5"], r"--caption_probability 1.5 must lie in \[0, 1\]"),
    (["--output_dir", "afile"], "--output_dir afile is a file; pass a folder path"),
    (["--output_dir", "afile/out"], "--output_dir afile/out lies under the file afile"),
    (["--use_8bit_adam"], "needs bitsandbytes"),
    (["--learning_rate", "0"], "--learning_rate 0.0 must be a positive number"),
    (["--method", "svfit", "--text_encoder_lr", "nan"], "--text_encoder_lr nan must be a positive number"),
])
def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "corrupt" / "good.png")
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "huge.png").write_bytes(_png_declaring(20000, 20000))
    (tmp_path / "afile").write_text("not a folder")
    for folder, caption in (("blank_caption", b" \n"), ("latin1_caption", "caf\u00e9 sks dog".encode("latin-1"))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / folder / "a.png")
        (tmp_path / folder / "a.txt").write_bytes(caption)
    if "--use_8bit_adam" in extra:
        pytest.importorskip("torch")  # the check only fires where bitsandbytes is absent
        if __import__("importlib").util.find_spec("bitsandbytes"):
            pytest.skip("bitsandbytes is installed")
    loaded = []
    monkeypatch.setattr("diffusers.UNet2DConditionModel.from_pretrained", lambda *a, **k: loaded.append(1))
    code = train_dreambooth.main(["--output_dir", "out"] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    import re

    assert re.search(match, err), err
    assert not loaded and not (tmp_path / "out").exists()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares ``width`` x ``height`` pixels."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    raw[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    return bytes(raw)


def test_unknown_method_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_dreambooth.main(["--method", "dora"])
    assert info.value.code == 2 and "invalid choice: 'dora'" in capsys.readouterr().err


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        train_dreambooth.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--pretrained_model_name_or_path", "--with_prior_preservation", "--snr_gamma", "--svft_pattern",
                 "--avf_k", "--learning_rate_1d", "--export_lora_rank", "--checkpoints_total_limit", "--push_to_hub"):
        assert flag in text
    assert "SVFT paper" in text and "SVDiff paper" in text


def test_images_of_every_mode_are_handled(tmp_path):
    Image.new("L", (20, 10), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 10 x 20
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(tmp_path / "gray.png").mode == "RGB"
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert open_rgb(tmp_path / "cmyk.jpg").mode == "RGB"
    assert open_rgb(tmp_path / "rotated.jpg").size == (10, 20)
    assert EXAMPLE_DATA.is_dir() and len(list(EXAMPLE_DATA.glob("*.png"))) >= 3


def test_sdxl_base_trains_both_text_encoders(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = tiny_pipeline_path("sdxl")
    result = launch(["--method", "svfit", "--rank", "2", "--pretrained_model_name_or_path", str(base),
                     "--resolution", "32", "--max_train_steps", "2", "--learning_rate", "5e-2", "--train_text_encoder",
                     "--output_dir", "out"], tmp_path, accelerate=False)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "out" / "svd_adapter.safetensors"
    prefixes = {k.split(".")[0] for k in load_file(str(path))}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    before = render(pipe)
    pipe.load_svd_adapter(path)
    assert np.abs(render(pipe) - before).max() > 1e-4


def test_cache_latents_and_tensorboard(tmp_path):
    result = launch(["--method", "svdiff", "--cache_latents", "--report_to", "tensorboard", "--max_train_steps", "3",
                     "--validation_steps", "2", "--output_dir", "out"], tmp_path, accelerate=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "validation" / "step000002_0.png").is_file()


def test_precision_and_schedule_flags_together(tmp_path):
    """bf16 frozen weights with float32 adapter tensors, gradient checkpointing, Min-SNR, noise offset, a
    cosine schedule with warm-up and checkpoint pruning, in one run."""
    result = launch(["--method", "vectorfit", "--gradient_checkpointing", "--snr_gamma", "5", "--noise_offset", "0.1",
                     "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--checkpointing_steps", "1",
                     "--checkpoints_total_limit", "2", "--max_train_steps", "4", "--mixed_precision", "bf16",
                     "--train_text_encoder", "--output_dir", "out"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    tensors = load_file(str(out / "svd_adapter.safetensors"))
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if not k.endswith((".rows", ".cols")))
    pipe = base_pipe()  # an fp32 pipeline: the loader rounds its weights to bf16 to meet the training basis
    before = render(pipe)
    pipe.load_svd_adapter(out)
    assert np.abs(render(pipe) - before).max() > 1e-4


def test_pissa_export_is_the_trained_model_on_the_original_weights(tmp_path):
    """PiSSA trains on W_res = W - B0 A0; its file holds [B, -B0][A; A0], so the original W plus it is the model."""
    import argparse
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from svdiff_trainer.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd15")
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="pissa"))
    init = {"unet_lora_layers": {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}}
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([10]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        trained, base = unet(x, t, e).sample, pipe.unet(x, t, e).sample
    from svdiff_trainer.backends import PeftLoraBackend

    backend = PeftLoraBackend(RunConfig.from_flags({"method": "pissa", "train_text_encoder": False}))
    backend.pissa_init = init
    backend.save_final(tmp_path, "base", "StableDiffusionPipeline", unet, {}, None)
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        exported = pipe.unet(x, t, e).sample
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-5)


def test_validation_images_do_not_depend_on_the_batch_size(tmp_path):
    """Validation images are rendered --sample_batch_size at a time with one generator per image: image i is
    the same picture however many are rendered with it (the toy-world report measures these images)."""
    import argparse

    from svdiff_trainer.validation import render_validation

    pipe = base_pipe()
    rows = {}
    for batch in (1, 2, 5):
        args = RunConfig.from_flags(dict(validation_prompts=["a photo of sks toy", "a red toy"],
                                         num_validation_images=3, validation_seed=7, seed=None,
                                         sample_batch_size=batch, num_inference_steps=3, guidance_scale=5.0,
                                         resolution=32))
        rows[batch] = render_validation(args, pipe, 4, tmp_path / f"b{batch}")
        assert sorted(p.name for p in (tmp_path / f"b{batch}").iterdir()) == [
            "step000004_0.png", "step000004_1.png", "step000004_2.png",
            "step000004_p1_0.png", "step000004_p1_1.png", "step000004_p1_2.png"]
    first = np.stack([np.asarray(im, dtype=np.int16) for row in rows[1] for im in row])
    for batch in (2, 5):
        other = np.stack([np.asarray(im, dtype=np.int16) for row in rows[batch] for im in row])
        assert np.abs(other - first).max() <= 1  # 8-bit rounding of float-level differences at most
    assert np.abs(first[0] - first[1]).max() > 10  # different seeds give different images


def test_text_encoder_training_is_off_by_default_and_can_be_turned_off(monkeypatch):
    from svdiff_trainer.args import parse_args

    assert parse_args(["--method", "svfit"]).method.train_text_encoder is False  # the tiny model: diffusers' default
    assert parse_args(["--method", "svfit", "--train_text_encoder"]).method.train_text_encoder is True
    from svdiff_toyworld import preset

    if preset.available():  # the toy world turns it on (`TRAIN_TEXT_ENCODER`); the user's flag still wins
        monkeypatch.delenv("SVDIFF_TOOLS_EMBEDDED", raising=False)
        assert parse_args(["--method", "svfit"]).method.train_text_encoder is preset.TRAIN_TEXT_ENCODER
        assert parse_args(["--method", "svfit", "--no-train_text_encoder"]).method.train_text_encoder is False


def test_caption_files_give_each_image_its_own_prompt(tmp_path, caplog):
    from svdiff_trainer.data import DreamBoothDataset, SubjectData, load_captions, load_folder

    for i, name in enumerate(("a", "b", "c")):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a photo of sks dog\n  on a  red sofa\n", encoding="utf-8")
    (tmp_path / "c.caption").write_text("a photo of sks dog on grass", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")
    with caplog.at_level("WARNING"):
        images = load_folder(tmp_path, ".txt")
    assert "notes.md" in caplog.text and "a.txt" not in caplog.text and len(images) == 3
    assert load_captions(tmp_path, ".txt", "a photo of sks dog") == [
        "a photo of sks dog on a red sofa", "a photo of sks dog", "a photo of sks dog"]
    assert load_captions(tmp_path, ".caption", "P") == ["P", "P", "a photo of sks dog on grass"]
    assert load_captions(tmp_path, None, "P") == ["P"] * 3
    captions = load_captions(tmp_path, ".txt", "a photo of sks dog")
    data = DreamBoothDataset([], 8, True, False, 0, subjects=[SubjectData(images, "", "", "a photo of sks dog",
                                                                          captions)])
    for index in range(6):  # image i % 3 comes with caption i % 3, whatever the epoch's order
        item = data[index]
        expected = torch.from_numpy(np.asarray(images[index % 3], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(item["instance"], expected) and item["prompt"] == captions[index % 3]


@pytest.mark.parametrize("name", ["example_toy", "example_robot", "example_car", "example_subject"])
def test_the_shipped_subjects_are_captioned_with_what_their_views_change(name):
    from svdiff_toyworld.world import SUBJECTS
    from svdiff_trainer.data import load_captions

    subject = SUBJECTS["example_toy" if name == "example_subject" else name]
    folder = EXAMPLE_DATA if name == "example_subject" else TOY_SUBJECTS / name
    captions = load_captions(folder, ".txt", "unused")
    views = subject.views(len(captions))
    assert len(captions) == 5 and captions == [subject.caption(view) for view in views]
    for caption, view in zip(captions, views):
        assert caption.startswith(f"{subject.instance_prompt.replace(subject.class_word, '')}{view.objects[0].size} ")
        assert f"on a {view.background} background" in caption and "green" not in caption  # recontext stays unseen


def test_caption_probability_mixes_captions_with_the_instance_prompt(tmp_path):
    from svdiff_trainer.data import DreamBoothDataset, SubjectData

    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(2)]
    subject = SubjectData(images, "", "", "P", ["caption 0", "caption 1"])
    prompts = {p: [DreamBoothDataset([], 8, True, False, 0, subjects=[subject], caption_probability=p)[i]["prompt"]
                   for i in range(400)] for p in (0.0, 0.5, 1.0)}
    assert set(prompts[0.0]) == {"P"} and "P" not in prompts[1.0]
    mixed = prompts[0.5]
    assert 0.4 < mixed.count("P") / len(mixed) < 0.6
    assert all(p in ("P", f"caption {i % 2}") for i, p in enumerate(mixed))
    assert mixed == [DreamBoothDataset([], 8, True, False, 0, subjects=[subject], caption_probability=0.5)[i]["prompt"]
                     for i in range(400)]  # drawn from (seed, epoch, index): a resumed run sees the same prompts


def test_the_toy_world_report_measures_only_a_shipped_subject_under_its_own_prompt(tmp_path):
    """The trainer's subject report identifies against a shipped subject's renders: it must name the subject
    whose views were trained (by content, wherever the folder is) and stay silent for any other folder or prompt,
    where its figures would describe the wrong subject."""
    import shutil

    from svdiff_toyworld.assets import DATA
    from svdiff_toyworld.preset import shipped_subject
    from svdiff_trainer.args import EXAMPLE_DATA

    assert shipped_subject(EXAMPLE_DATA, "a photo of sks toy").name == "example_toy"
    robot = shutil.copytree(DATA / "subjects" / "example_robot", tmp_path / "my_robot")
    assert shipped_subject(robot, "a photo of zwx robot").name == "example_robot"
    assert shipped_subject(robot, "a photo of sks toy") is None  # another subject's prompt
    assert shipped_subject(robot, "a photo of sks robot") is None  # its views, another identifier
    next(robot.glob("*.png")).unlink()
    assert shipped_subject(robot, "a photo of zwx robot") is None  # not the same views
    assert shipped_subject(tmp_path / "missing", "a photo of sks toy") is None


def test_toy_world_defaults_and_the_model_card_settings(monkeypatch):
    """Flags the user gives win over the toy world's per-method defaults; the card states what was in effect."""
    from svdiff_trainer.args import TrainingInputError, parse_args, validate
    from svdiff_trainer.validation import training_settings

    tiny = parse_args(["--method", "svfit"])
    assert (tiny.optim.lr_scheduler, tiny.data.caption_probability, tiny.data.prior_loss_weight) == ("constant", 1.0, 1.0)
    assert tiny.optim.text_encoder_lr is None
    assert "captions" not in training_settings(tiny) and training_settings(tiny)["text encoder"] == "frozen"
    assert training_settings(tiny, captioned=3)["captions"] == "3 caption files, used on every step"
    assert training_settings(tiny, captioned=0)["captions"].startswith("none (no caption files")
    from svdiff_toyworld import preset

    if not preset.available():
        pytest.skip("the pretrained toy-world pipeline is not shipped")
    monkeypatch.delenv("SVDIFF_TOOLS_EMBEDDED", raising=False)
    svfit, wanted = parse_args(["--method", "svfit"]), preset.METHOD_DEFAULTS["svfit"]
    assert (svfit.optim.learning_rate, svfit.optim.lr_scheduler, svfit.method.rank) == (wanted.learning_rate, wanted.lr_scheduler,
                                                                     wanted.rank)
    assert svfit.data.caption_probability == wanted.caption_probability == preset.CAPTION_PROBABILITY
    vectorfit = parse_args(["--method", "vectorfit"])
    assert vectorfit.data.caption_probability == 0.0  # captions measured worse there
    assert training_settings(vectorfit)["captions"] == "not used (the instance prompt on every step)"
    assert training_settings(svfit)["captions"] == "used on 50% of steps (else the instance prompt)"
    assert training_settings(svfit, 5)["captions"] == "5 caption files, used on 50% of steps (else the instance prompt)"
    assert training_settings(svfit, 0)["captions"] == "none (no caption files: the instance prompt on every step)"
    assert training_settings(vectorfit, 5)["captions"] == "not used (the instance prompt on every step)"
    settings = training_settings(svfit)
    assert settings["learning rate"] == f"{wanted.learning_rate:g} ({wanted.lr_scheduler})"
    assert settings["rank"].startswith(f"{wanted.rank:g} (share")
    assert (svfit.optim.text_encoder_lr, svfit.data.prior_loss_weight) == (wanted.text_encoder_lr, wanted.prior_loss_weight)
    assert settings["text encoder"] == f"adapted, learning rate {wanted.text_encoder_lr:g}"
    assert settings["prior preservation"] == f"`a photo of a toy`, weight {wanted.prior_loss_weight:g}"
    mine = parse_args(["--method", "svfit", "--lr_scheduler", "linear", "--caption_probability", "1",
                       "--text_encoder_lr", "0.3", "--prior_loss_weight", "0.5"])
    assert (mine.optim.lr_scheduler, mine.data.caption_probability, mine.optim.text_encoder_lr, mine.data.prior_loss_weight) == (
        "linear", 1.0, 0.3, 0.5)
    assert training_settings(mine)["prior preservation"] == "`a photo of a toy`, weight 0.5"
    own_rate = parse_args(["--method", "svfit", "--learning_rate", "1e-2"])  # the text encoder follows it
    assert (own_rate.optim.learning_rate, own_rate.optim.text_encoder_lr) == (1e-2, None)
    assert training_settings(own_rate)["text encoder"] == "adapted"
    assert parse_args(["--method", "svdiff"]).optim.lr_scheduler == preset.METHOD_DEFAULTS["svdiff"].lr_scheduler

    # the cached class images are kept per sampling setting: a quick 2-step run must not leave its images to others
    assert Path(svfit.data.class_data_dir) == preset.class_data_dir(25, 5.0, 64)
    assert Path(svfit.data.class_data_dir).parent.name.endswith("-25steps-cfg5-64px")
    quick = parse_args(["--method", "svfit", "--num_inference_steps", "2"])
    assert (quick.validation.num_inference_steps, quick.data.resolution) == (2, 64)
    assert len({svfit.data.class_data_dir, quick.data.class_data_dir, parse_args(["--method", "lora"]).data.class_data_dir,
                parse_args(["--method", "svfit", "--guidance_scale", "7.5"]).data.class_data_dir,
                parse_args(["--method", "svfit", "--resolution", "32"]).data.class_data_dir}) == 4  # lora shares svfit's
    assert parse_args(["--method", "svfit", "--class_data_dir", "mine"]).data.class_data_dir == "mine"
    # a 0 the user gives stays theirs on the toy world: guidance 0 samples unconditionally, counts of 0 are refused
    assert parse_args(["--method", "svfit", "--guidance_scale", "0"]).validation.guidance_scale == 0.0
    for flag in ("--max_train_steps", "--num_validation_images", "--num_inference_steps"):
        with pytest.raises(TrainingInputError, match=f"{flag} must be at least 1"):
            validate(parse_args(["--method", "svfit", flag, "0"]))


def test_validation_renders_each_step_once_and_the_last_from_the_saved_file(tmp_path, monkeypatch):
    """--validation_steps renders in the loop; the last step's images are the final check's (the adapter read back
    from its file), so the loop skips that step instead of rendering it twice."""
    from svdiff_trainer import validation

    rendered = []
    real = validation.render_validation
    monkeypatch.setattr(validation, "render_validation",
                        lambda args, pipe, step, *a, **k: rendered.append(step) or real(args, pipe, step, *a, **k))
    monkeypatch.chdir(tmp_path)
    code = train_dreambooth.main(["--method", "svdiff", "--max_train_steps", "4", "--validation_steps", "2",
                                  "--num_validation_images", "1", "--output_dir", "out"])
    assert code in (0, None) and rendered == [2, 4]
    assert sorted(p.name for p in (tmp_path / "out" / "validation").iterdir()) == ["step000002_0.png",
                                                                                   "step000004_0.png"]
