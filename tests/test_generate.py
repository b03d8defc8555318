"""pipelines/generate.py on a tiny saved pipeline: --compare writes base and adapted images and one grid."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import svdiff_tools as st
import svdiff_tools.diffusers  # noqa: F401  (the pipeline verbs)
from svdiff_trainer.tiny import tiny_pipeline_path

from reference import randomize_adapter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
import generate  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("gen")
    base = tiny_pipeline_path("sd15", cache_dir=root / "models")
    pipe = DiffusionPipeline.from_pretrained(str(base))
    st.inject_adapter(pipe.unet, st.SVDAdapterConfig(method="svfit", rank=4, target_modules="unet"))
    randomize_adapter(pipe.unet, magnitude=0.5)
    return base, pipe.save_svd_adapter(root / "adapter")


def test_compare_writes_images_and_grid_without_base_flag(saved, tmp_path):
    base, adapter = saved
    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "pipelines" / "generate.py"), "--adapter", f"{adapter}:0.8",
           "--prompt", "a photo of sks dog", "--num_images", "2", "--steps", "2", "--height", "32", "--width", "32",
           "--compare", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["base_000.png", "base_001.png", "grid.png", "img_000.png", "img_001.png"]
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 32 and grid.size[1] > 2 * 32
    base_img, adapted = (np.asarray(Image.open(out / f"{p}_000.png"), dtype=np.float32) for p in ("base", "img"))
    assert np.abs(base_img - adapted).max() > 5  # the adapter changes the picture
    assert "grid.png" in result.stdout


def test_fuse_and_scale_zero(saved, tmp_path):
    base, adapter = saved
    common = ["--base", str(base), "--prompt", "a dog", "--num_images", "1", "--steps", "2", "--height", "32",
              "--width", "32"]
    assert generate.main(common + ["--adapter", str(adapter), "--fuse", "--out", str(tmp_path / "fused")]) == 0
    assert generate.main(common + ["--adapter", str(adapter), "--out", str(tmp_path / "live")]) == 0
    assert generate.main(common + ["--adapter", str(adapter), "--scale", "0", "--out", str(tmp_path / "zero")]) == 0
    assert generate.main(common + ["--out", str(tmp_path / "plain")]) == 0
    load = lambda d: np.asarray(Image.open(tmp_path / d / "img_000.png"), dtype=np.float32)  # noqa: E731
    assert np.abs(load("fused") - load("live")).max() <= 1
    assert np.array_equal(load("zero"), load("plain"))


def test_bad_adapter_is_one_line_and_exit_code_2(saved, tmp_path, capsys):
    base, _ = saved
    code = generate.main(["--base", str(base), "--adapter", str(tmp_path / "missing.safetensors"),
                          "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_split_adapter_weight():
    assert generate.split_adapter("out/a.safetensors:0.5") == ("out/a.safetensors", 0.5)
    assert generate.split_adapter("out/a.safetensors") == ("out/a.safetensors", 1.0)
    assert generate.split_adapter("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
