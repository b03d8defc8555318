"""Issue 33: a user's own subject. The recipe for any folder, one loader and evaluator for any output, the DINO /
CLIP metrics on tiny random models against a float64 reference, held-out toy-world subjects read back by the metric
network."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import svdiff_tools as st
import svdiff_tools.diffusers  # noqa: F401  (pipe.load_svd_adapter)
from svdiff_trainer.args import parse_args, recipe_lines
from svdiff_trainer.recipe import NAMED_BASE_RECIPE, Recipe, class_prompt_for, read_subject, steps_for
from svdiff_trainer.tiny import tiny_pipeline_path

from reference import randomize_adapter

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the recipe
@pytest.mark.parametrize("prompt,class_prompt,expected", [
    ("a photo of sks dog", None, ("sks", "dog")),
    ("a photo of sks dog wearing a hat", None, ("sks", "dog")),  # the form the old heuristic missed
    ("a photo of a zwx car", None, ("zwx", "car")),
    ("sks dog on the beach", None, ("sks", "dog")),
    ("an ohwx toy", None, ("ohwx", "toy")),
    ("a photo of sks teddy bear", "a photo of a teddy bear", ("sks", "teddy")),
    ("zwx", None, None),
    ("a photo of", None, None),
])
def test_the_identifier_and_class_are_read_from_the_prompt(prompt, class_prompt, expected):
    assert read_subject(prompt, class_prompt) == expected


def test_class_prompts_and_steps_scaled_to_the_image_count():
    assert class_prompt_for("dog") == "a photo of a dog" and class_prompt_for("owl") == "a photo of an owl"
    recipe = Recipe(reference_images=5, min_scale=2 / 3, max_scale=2.0)
    assert [steps_for(600, n, recipe) for n in (1, 3, 5, 8, 10, 200)] == [400, 400, 600, 960, 1200, 1200]


def _folder(tmp_path, n=5, name="mine"):
    from svdiff_trainer.presets import EXAMPLE_DATA

    folder = tmp_path / name
    folder.mkdir()
    for i, p in enumerate(sorted(EXAMPLE_DATA.glob("*.png"))[:n]):
        shutil.copy(p, folder / f"{i}.png")
    return folder


def test_a_named_base_gets_the_recipe_for_any_folder_and_user_flags_win(tmp_path):
    """With only --instance_data_dir and --instance_prompt on a named base: prior preservation with 100 class images
    of 'a photo of a car' cached per base version, the recontextualisation prompt, 400 steps scaled to 8 images."""
    base = str(tiny_pipeline_path("sd15"))
    mine = _folder(tmp_path, 5)
    for i in range(3):
        Image.new("RGB", (40, 30), (i, 90, 9)).save(mine / f"extra{i}.jpg")
    cfg = parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", str(mine), "--instance_prompt",
                      "a photo of zwx car"])
    d = cfg.data
    assert (d.identifier, d.class_word, d.class_prompt) == ("zwx", "car", "a photo of a car")
    assert d.with_prior_preservation and d.num_class_images == NAMED_BASE_RECIPE.num_class_images == 100
    assert "svdiff-tools/class-images/a-photo-of-a-car-" in d.class_data_dir
    assert cfg.validation.validation_prompts == ["a photo of zwx car", "a photo of zwx car on the beach"]
    assert cfg.optim.max_train_steps == 640 and "scaled to 8 images (x1.60)" in cfg.chosen["max_train_steps"]
    again = parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", str(mine), "--instance_prompt",
                        "a photo of sks car"])
    assert again.data.class_data_dir == d.class_data_dir  # one cache per base and class prompt, not per subject
    other = parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", str(mine), "--instance_prompt",
                        "a photo of zwx car", "--resolution", "64"])
    assert other.data.class_data_dir != d.class_data_dir  # sampling settings are part of what makes them
    mine_flags = parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", str(mine),
                             "--instance_prompt", "a photo of zwx car", "--no-with_prior_preservation",
                             "--max_train_steps", "50", "--validation_prompt", "zwx car", "--num_train_epochs", "2"])
    assert not mine_flags.data.with_prior_preservation and mine_flags.optim.max_train_steps == 50
    assert mine_flags.validation.validation_prompts == ["zwx car"]
    lines = recipe_lines(mine_flags)
    assert lines[2].startswith("prior preservation: off")
    epochs = parse_args(["--pretrained_model_name_or_path", base, "--instance_data_dir", str(mine), "--instance_prompt",
                         "a photo of zwx car", "--num_train_epochs", "3"])
    assert epochs.optim.max_train_steps is None and epochs.optim.num_train_epochs == 3  # epochs given: no steps filled


def test_the_toy_world_recipe_applies_to_any_folder(tmp_path, monkeypatch):
    """On the embedded toy world, another folder gets what the main job gets (issue 33's first complaint)."""
    from svdiff_toyworld import preset

    if not preset.available():
        pytest.skip("the pretrained toy-world pipeline is not shipped")
    monkeypatch.delenv("SVDIFF_TOOLS_EMBEDDED", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mine = _folder(tmp_path, 5)
    main_job = parse_args(["--method", "svfit"])
    user = parse_args(["--method", "svfit", "--instance_data_dir", str(mine), "--instance_prompt", "a photo of zwx toy"])
    for name in ("with_prior_preservation", "num_class_images", "class_prompt", "class_data_dir", "max_train_steps",
                 "learning_rate", "train_text_encoder", "resolution", "num_validation_images"):
        assert user.get(name) == main_job.get(name), name
    assert user.data.num_class_images == preset.NUM_CLASS_IMAGES
    assert user.validation.validation_prompts == ["a photo of zwx toy", "a zwx toy on a green background"]
    assert main_job.validation.validation_prompts == preset.validation_prompts()
    robot = parse_args(["--method", "lora", "--instance_data_dir", str(mine), "--instance_prompt", "a photo of qhv robot"])
    assert Path(robot.data.class_data_dir) == preset.class_data_dir(25, 5.0, 64, "robot")


# ------------------------------------------------------------------------------------------ the user's data
def test_duplicates_one_image_and_missing_captions_are_said(tmp_path, caplog):
    from svdiff_trainer.data import check_user_images

    mine = _folder(tmp_path, 3)
    shutil.copy(mine / "0.png", mine / "copy.png")
    (mine / "1.txt").write_text("a photo of sks toy on a blue background")
    with caplog.at_level("WARNING"):
        images, captions = check_user_images(mine, [Image.open(p).convert("RGB") for p in sorted(mine.glob("*.png"))],
                                             ["a", "b", "c", "d"], ".txt")
    assert len(images) == len(captions) == 3  # the copy is trained once, not twice
    text = caplog.text
    assert "copy.png is a duplicate of 0.png" in text
    assert "2 of 3 images have no caption file" in text
    one = _folder(tmp_path, 1, "one")
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_user_images(one, [Image.open(one / "0.png")], ["a"], ".txt")
    assert "only one image" in caplog.text


def test_an_identifier_the_tokenizer_splits_or_that_is_a_common_word_is_said(caplog):
    from transformers import CLIPTokenizer

    from svdiff_toyworld.assets import pipeline_folder
    from svdiff_toyworld.preset import RECIPE
    from svdiff_trainer.data import check_identifier

    folder = pipeline_folder() / "tokenizer"
    if not folder.is_dir():
        pytest.skip("the pretrained toy-world pipeline is not shipped")
    tok = CLIPTokenizer.from_pretrained(folder)
    with caplog.at_level("WARNING"):
        assert check_identifier(tok, "sks", "toy", RECIPE.known_words) == ""
        split = check_identifier(tok, "myqqzt", "toy", RECIPE.known_words)
        common = check_identifier(tok, "red", "toy", RECIPE.known_words)
        same = check_identifier(tok, "toy", "toy", RECIPE.known_words)
    assert "splits into 6 tokens" in split
    assert "already means something" in common and "'red'" in common
    assert "is the class word" in same


# ------------------------------------------------------------------------------------------ any output, loaded
@pytest.fixture(scope="module")
def adapted_outputs(tmp_path_factory):
    """One svd adapter on the tiny SD 1.5 pipeline, and its exact exports: a diffusers LoRA file, a kohya file, a PEFT
    folder; plus a trainer-style output folder."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("outputs")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_path("sd15")), safety_checker=None)
    unet = copy.deepcopy(pipe.unet)
    st.inject_adapter(unet, st.SVDAdapterConfig(method="svfit", rank=2, target_modules="unet-attention"))
    randomize_adapter(unet, magnitude=0.5)
    st.save_adapter(unet, out / "svd_adapter.safetensors")
    st.export_lora(unet, out / "diffusers_lora.safetensors")
    st.export_lora(unet, out / "kohya_lora.safetensors", key_format="kohya")
    st.export_lora(unet, out / "peft_folder", key_format="peft")
    (out / "run").mkdir()
    shutil.copy(out / "svd_adapter.safetensors", out / "run" / "svd_adapter.safetensors")
    return out


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("name,kind", [("svd_adapter.safetensors", "svd adapter file"),
                                       ("diffusers_lora.safetensors", "lora file"),
                                       ("kohya_lora.safetensors", "lora file"),
                                       ("peft_folder", "peft folder"), ("run", "svd adapter file")])
def test_any_output_loads_into_a_pipeline_as_the_adapter_it_holds(adapted_outputs, name, kind):
    from diffusers import StableDiffusionPipeline

    from svdiff_trainer.outputs import load_output

    def fresh():
        return StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_path("sd15")), safety_checker=None)

    base = _unet_out(fresh())
    reference = fresh()
    reference.load_svd_adapter(str(adapted_outputs / "svd_adapter.safetensors"))
    expected = _unet_out(reference)
    pipe = fresh()
    assert load_output(pipe, adapted_outputs / name) == kind
    got = _unet_out(pipe)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the UNet
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "nothing", "does not exist"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "is not a .safetensors file"),
    (lambda p: (p / "half.safetensors").write_bytes(b"\x10\x00") and p / "half.safetensors", "not a readable"),
    (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "holds no trained output"),
])
def test_what_is_no_output_gets_one_sentence(tmp_path, make, match):
    from svdiff_trainer.outputs import OutputNotLoadable, output_kind

    with pytest.raises(OutputNotLoadable, match=match) as info:
        output_kind(make(tmp_path))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ DINO / CLIP
@pytest.fixture(scope="module")
def tiny_metric_models(tmp_path_factory):
    """Random DINO (ViT), DINOv2 and CLIP models of the real classes, saved as folders with their processors."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel)

    from svdiff_trainer.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("metric_models")
    torch.manual_seed(0)
    small = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4)
    ViTModel(ViTConfig(**small), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    Dinov2Model(Dinov2Config(**small)).save_pretrained(root / "dinov2")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dinov2")
    tok = tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=small, projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=tok).save_pretrained(root / "clip")
    return root


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("dino", ["dino", "dinov2"])
def test_dino_clip_i_and_clip_t_equal_a_float64_reference(tiny_metric_models, dino):
    """Each metric against the formula computed here in float64 from the models' own outputs: mean over generated
    images of the mean cosine to the real images (DINO: the CLS token of the last hidden state; CLIP-I: the projected
    image embedding) and of the cosine to the prompt's projected text embedding, the identifier removed."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    from svdiff_trainer.photo_metrics import PhotoMetrics, PhotoSubject

    root = tiny_metric_models
    generated, real = _images(3, 1), _images(4, 2)
    metrics = PhotoMetrics(str(root / dino), str(root / "clip"))
    got = metrics.score(generated, PhotoSubject(real, "sks", "dog"), "a photo of sks dog on the beach")

    def unit(x):
        x = x.double()
        return x / x.norm(dim=-1, keepdim=True)

    proc, model = AutoImageProcessor.from_pretrained(root / dino), AutoModel.from_pretrained(root / dino).double()
    with torch.no_grad():
        cls = [unit(model(pixel_values=proc(images=im, return_tensors="pt")["pixel_values"].double())
                    .last_hidden_state[:, 0]) for im in (generated, real)]
        clip_proc, clip = CLIPProcessor.from_pretrained(root / "clip"), CLIPModel.from_pretrained(root / "clip").double()
        out = clip(pixel_values=clip_proc(images=generated + real, return_tensors="pt")["pixel_values"].double(),
                   input_ids=clip_proc(text=["a photo of dog on the beach"], return_tensors="pt")["input_ids"])
    emb = unit(out.image_embeds)
    text = unit(out.text_embeds)
    dino_ref = [float(np.mean([float(cls[0][i] @ cls[1][j]) for j in range(4)])) for i in range(3)]
    clip_i_ref = [float(np.mean([float(emb[i] @ emb[3 + j]) for j in range(4)])) for i in range(3)]
    clip_t_ref = [float(emb[i] @ text[0]) for i in range(3)]
    for key, ref in (("dino", dino_ref), ("clip_i", clip_i_ref), ("clip_t", clip_t_ref)):
        assert got[key]["mean"] == pytest.approx(np.mean(ref), abs=2e-4), key
        half = 1.96 * np.std(ref, ddof=1) / np.sqrt(3)
        assert got[key]["high"] - got[key]["low"] == pytest.approx(2 * half, abs=4e-4), key
    same = metrics.score(real, PhotoSubject(real, "sks", "dog"), "a photo of sks dog")
    assert same["dino"]["mean"] > got["dino"]["mean"]  # the real images are closest to themselves


def test_the_evaluate_command_scores_a_lora_file_and_an_adapter_with_named_metric_models(
        adapted_outputs, tiny_metric_models, tmp_path, capsys):
    from svdiff_trainer.evaluate import main

    mine = _folder(tmp_path, 3)
    common = ["--pretrained_model_name_or_path", str(tiny_pipeline_path("sd15")), "--instance_data_dir", str(mine),
              "--instance_prompt", "a photo of sks toy", "--num_images", "2", "--num_inference_steps", "2", "--resolution", "32",
              "--dino_model", str(tiny_metric_models / "dino"), "--clip_model", str(tiny_metric_models / "clip"),
              "--report_dir", str(tmp_path / "reports")]
    for output in ("kohya_lora.safetensors", "svd_adapter.safetensors", "peft_folder"):
        assert main([str(adapted_outputs / output), *common]) == 0
        text = capsys.readouterr().out
        assert "### Subject measured with DINO and CLIP" in text and "| adapted | `a photo of sks toy` |" in text
    report = json.loads((tmp_path / "reports" / "photo_metrics.json").read_text())
    assert set(report["adapted"]["prompt 0"]) >= {"dino", "clip_i", "clip_t"} and report["adapted"]["prompt 0"]["images"] == 2
    assert main([str(tmp_path / "missing.safetensors"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_metric = [a for a in common if "metric_models" not in a and a not in ("--dino_model", "--clip_model")]
    assert main([str(adapted_outputs / "svd_adapter.safetensors"), *no_metric]) == 2
    assert "name --dino_model and/or --clip_model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ held-out subjects
def test_held_out_subjects_are_new_combinations_split_into_tuning_and_test():
    from svdiff_toyworld.world import ALL_SUBJECTS, HELD_OUT, SUBJECTS, TEST_SUBJECTS, TUNING_SUBJECTS

    assert len(TEST_SUBJECTS) >= 8 and not set(TEST_SUBJECTS) & set(TUNING_SUBJECTS)
    assert set(SUBJECTS) <= set(TUNING_SUBJECTS) and set(ALL_SUBJECTS) == set(TEST_SUBJECTS) | set(TUNING_SUBJECTS)
    combos = [(s.obj.cls, s.obj.shape, s.obj.colour) for s in ALL_SUBJECTS.values()]
    assert len(set(combos)) == len(combos) and all(c in HELD_OUT for c in combos)  # never drawn in pretraining


def test_the_metric_network_reads_every_held_out_subject_from_its_own_views(tmp_path):
    """The report of a user's folder identifies against renders of the instance the network reads from the folder:
    for every held-out subject that instance is the subject itself."""
    from svdiff_toyworld import metric, preset
    from svdiff_toyworld.assets import write_subject_images
    from svdiff_toyworld.infer import infer_subject
    from svdiff_toyworld.world import ALL_SUBJECTS

    if not (metric.DEFAULT_PATH / "model.safetensors").is_file():
        pytest.skip("no shipped metric network")
    net = metric.load()
    for name, subject in ALL_SUBJECTS.items():
        folder = tmp_path / name
        write_subject_images(subject, folder)
        read, why = infer_subject(folder, subject.identifier, subject.class_word, net)
        assert why == "" and read.obj.identity == subject.obj.identity, (name, why, read)
    evaluator = preset.SubjectEvaluator()
    robot = tmp_path / "pink_robot"
    with pytest.raises(Exception, match="reads these images as a robot, not the prompt's toy"):
        evaluator.subject_for(robot, "a photo of qhv toy")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, name in enumerate(("green_toy", "red_toy", "pink_toy")):
        shutil.copy(next((tmp_path / name).glob("*_0.png")), mixed / f"{i}.png")
    with pytest.raises(Exception, match="do not show one toy-world instance"):
        evaluator.subject_for(mixed, "a photo of sks toy")
