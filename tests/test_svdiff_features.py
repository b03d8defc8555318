"""Issue 15: SVDiff's own features: Cut-Mix-Unmix (augmentation, prompts, the unmix term), adapter composition
and single-image editing (CoSINE), on the tiny pipelines."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import svdiff_tools as st
import svdiff_tools.diffusers  # noqa: F401  (the pipeline verbs)
from svdiff_trainer.data import CUTMIX_OBJECT_SIZE, DreamBoothDataset, SubjectData, cutmix, mixed_prompt
from svdiff_trainer.tiny import tiny_pipeline, tiny_pipeline_path
from svdiff_trainer.unmix import UnmixRecorder, identifier_positions, install

ROOT = Path(__file__).resolve().parents[1]


def _solid(colour, size=40):
    return Image.new("RGB", (size, size), colour)


def test_cutmix_composes_flat_backdrop_views_into_one_scene():
    """Subjects on flat backdrops are cut out, scaled to CUTMIX_OBJECT_SIZE and centred in their halves on the left
    view's backdrop; the right view's backdrop does not appear."""
    left, right = _solid((250, 250, 250), 64), _solid((20, 20, 30), 64)
    left.paste((255, 0, 0), (40, 10, 60, 20))  # a wide red bar near the top right of its view: 20 x 10
    right.paste((0, 0, 255), (5, 30, 15, 60))  # a tall blue bar at the bottom left of its view: 10 x 30
    mixed = np.asarray(cutmix(left, right, 32)).astype(int)
    red = (mixed[..., 0] > 200) & (mixed[..., 1] < 60)
    blue = (mixed[..., 2] > 200) & (mixed[..., 0] < 60)
    assert (mixed[0, 0] == 250).all() and (mixed[-1, -1] == 250).all()  # the left view's backdrop everywhere else
    assert not ((mixed < 60).all(axis=-1)).any()  # no pixel of the right view's dark backdrop
    rows, cols = np.flatnonzero(red.any(1)), np.flatnonzero(red.any(0))
    assert cols[-1] < 16 and abs(cols.mean() - 7.5) <= 1 and abs(rows.mean() - 15.5) <= 1  # centred in the left half
    assert abs(len(cols) - CUTMIX_OBJECT_SIZE * 32) <= 1 and abs(len(rows) - CUTMIX_OBJECT_SIZE * 16) <= 1
    rows, cols = np.flatnonzero(blue.any(1)), np.flatnonzero(blue.any(0))
    assert cols[0] >= 16 and abs(cols.mean() - 23.5) <= 1 and abs(rows.mean() - 15.5) <= 1
    assert abs(len(rows) - CUTMIX_OBJECT_SIZE * 32) <= 1  # the longer side sets the scale
    blank = _solid((250, 250, 250), 64)  # a flat view with nothing on it falls back to halves
    halves = np.asarray(cutmix(blank, right, 32)).astype(int)
    assert (halves[:, :16] == 250).all() and (halves[:, 16:, 0] < 60).all()


def test_cutmix_scales_each_whole_view_into_its_half():
    """Views not on a flat backdrop are put side by side, as the paper does."""
    left, right = _solid((255, 0, 0)), _solid((0, 0, 255))
    left.paste((0, 255, 0), (0, 0, 8, 40))  # a green band at the left image's left edge: a centre strip misses it
    mixed = np.asarray(cutmix(left, right, 32)).astype(int)
    assert mixed.shape == (32, 32, 3)
    band = mixed[:, :2]  # the first 2 of the left half's 16 columns: the band's 8 of 40, scaled
    assert (band[..., 1] > 200).all() and (band[..., 0] < 60).all()
    assert (mixed[:, 4:16, 0] > 200).all() and (mixed[:, 4:16, 1] < 60).all()  # the rest of the left view: red
    assert (mixed[:, 16:, 2] > 200).all() and (mixed[:, 16:, 0] < 50).all()  # the right half is blue
    grid = Image.new("RGB", (40, 40))  # rows above and below the scaled view repeat its edge rows
    grid.paste((255, 255, 0), (0, 0, 40, 20))
    column = np.asarray(cutmix(grid, right, 32)).astype(int)[:, :16]
    assert (column[:8] == column[8]).all() and (column[24:] == column[23]).all()
    assert (column[:8, :, 1] > 200).all() and (column[24:, :, 1] < 60).all()  # yellow top, black bottom


def test_mixed_items_carry_prompts_and_sides_and_are_never_flipped(monkeypatch):
    from svdiff_trainer import data as data_module

    seen = []
    real = data_module.subject_cut_out
    monkeypatch.setattr(data_module, "subject_cut_out", lambda view: seen.append(id(view)) or real(view))
    toy = SubjectData([_solid((255, 0, 0))], "sks", "toy", "a photo of sks toy")
    robot = SubjectData([_solid((0, 0, 255))], "zwx", "robot", "a photo of zwx robot")
    data = DreamBoothDataset([], 32, True, True, 0, subjects=[toy, robot], cutmix_probability=1.0)
    for i in range(8):
        item = data[i]
        left, right = item["mix"]
        by_id = {"sks": toy, "zwx": robot}
        assert item["prompt"] == mixed_prompt(by_id[left], by_id[right])
        pixels = item["instance"]
        red_left = bool((pixels[0, :, :16] > 0.9).all())
        assert red_left == (left == "sks")  # the side the prompt names is the side the pixels show
    assert sorted(seen) == sorted({id(toy.images[0]), id(robot.images[0])})  # each view's cut-out made once
    plain = DreamBoothDataset([], 32, True, False, 0, subjects=[toy, robot], cutmix_probability=0.0)
    assert all(plain[i]["mix"] is None for i in range(4))
    assert {plain[i]["prompt"] for i in range(2)} == {toy.prompt, robot.prompt}


def test_unmix_term_is_zero_when_separated_and_positive_when_mixed():
    q, w = 16, 4  # a 4x4 layer; tokens 1 (left identifier) and 2 (right identifier)
    right_half = (torch.arange(q) % w) >= w / 2
    separated = torch.full((2, q, 4), 1e-3)
    separated[:, ~right_half, 1] = 1.0
    separated[:, right_half, 2] = 1.0
    mixed = torch.full((2, q, 4), 1.0)  # every token everywhere
    swapped = torch.full((2, q, 4), 1e-12)
    swapped[:, right_half, 1] = 1.0
    swapped[:, ~right_half, 2] = 1.0
    values = []
    for probs in (separated, mixed, swapped):
        rec = UnmixRecorder()
        rec.begin([(0, [1], [2])], (4, 4))
        rec.record(probs, heads=2)
        values.append(float(rec.end()))
    assert values[0] < 1e-5 and values[1] == pytest.approx(0.25, abs=1e-6) and values[2] == pytest.approx(1.0)


def test_unmix_processor_matches_the_default_attention_and_gives_a_gradient():
    pipe = tiny_pipeline("sd15")
    unet = pipe.unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    prompt = "a photo of sks toy on the left and zwx robot on the right"
    ids = pipe.tokenizer([prompt] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0].detach()
    with torch.no_grad():
        expected = unet(x, t, cond).sample
    rec = UnmixRecorder()
    assert install(unet, rec) > 0
    st.inject_adapter(unet, st.SVDAdapterConfig(method="svdiff", target_modules="unet-attention"))
    with torch.no_grad():
        assert torch.allclose(unet(x, t, cond).sample, expected, atol=1e-5)  # same attention, probabilities shown
    left, right = identifier_positions(pipe.tokenizer, prompt, "sks"), identifier_positions(pipe.tokenizer, prompt,
                                                                                            "zwx")
    assert left and right and min(right) > max(left)
    rec.begin([(0, left, right)], (8, 8))
    unet(x, t, cond).sample.sum()
    term = rec.end()
    assert term is not None and 0 < float(term) < 1 and term.requires_grad
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["svdiff", "lora"])  # the spectral and the PEFT backend
def test_cutmix_unmix_training_run(tmp_path, method):
    """The trainer trains two subjects with Cut-Mix-Unmix and renders each subject, then both together."""
    data = ROOT / "toyworld" / "svdiff_toyworld" / "data" / "subjects"
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--method", method, "--subject",
           f"{data / 'example_toy'}:sks:toy", "--subject", f"{data / 'example_robot'}:zwx:robot", "--cutmix_unmix",
           "--cutmix_probability", "1.0", "--max_train_steps", "3", "--num_validation_images", "1",
           "--output_dir", str(tmp_path / "joint")]
    env = dict(__import__("os").environ, SVDIFF_TOOLS_EMBEDDED="tiny")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "joint" / "validation").glob("*.png"))) == 3  # each subject, then both together


def test_adapters_trained_apart_compose(tmp_path):
    """Two adapters trained apart load together with their own weights and render."""
    base = tiny_pipeline("sd15")
    pipe = copy.deepcopy(base)
    for name, seed in (("toy", 1), ("robot", 2)):
        model = copy.deepcopy(base.unet)
        st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules="unet"), name)
        with torch.no_grad():
            for p in st.model.adapter_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        st.save_adapter(model, tmp_path / f"{name}.safetensors", adapter_name=name)
        pipe.load_svd_adapter(tmp_path / f"{name}.safetensors")
    pipe.set_svd_adapters(["toy", "robot"], [1.0, 0.5])
    assert sorted(pipe.get_active_svd_adapters()) == ["robot", "toy"]
    image = pipe("a sks toy on the left and a zwx robot on the right", num_inference_steps=2, height=32, width=32,
                 output_type="np").images
    assert np.isfinite(image).all()


def test_edit_script_writes_the_edit(tmp_path):
    image = ROOT / "trainer" / "svdiff_trainer" / "data" / "example_subject" / "example_toy_0.png"
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "edit.py"), str(image), "--prompt",
                             "a purple star toy", "--edit", "a purple star toy on a green background", "--base",
                             str(tiny_pipeline_path("sd15")), "--steps", "3", "--inference_steps", "3", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"edited.png", "reconstruction.png", "grid.png"} <= {p.name for p in tmp_path.iterdir()}
