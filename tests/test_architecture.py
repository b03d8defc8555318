"""The three parts and their one meeting point (docs/architecture.md): the library (`svdiff_tools`) imports neither
the trainer nor the toy world, the trainer never imports the toy world (it finds it through the entry-point group
``svdiff_trainer.presets``), and the library's wheel carries no model weights."""

import ast
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "svdiff_tools").rglob("*.py"))
TRAINER = sorted((ROOT / "trainer" / "svdiff_trainer").rglob("*.py"))


def _absolute_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module


def _relative_escapes(path: Path, root: Path) -> bool:
    """Whether a relative import climbs above the package rooted at ``root``."""
    depth = len(path.relative_to(root).parts) - 1
    return any(isinstance(n, ast.ImportFrom) and n.level > depth + 1 for n in ast.walk(ast.parse(path.read_text())))


@pytest.mark.parametrize("path", LIBRARY, ids=[str(p.relative_to(ROOT)) for p in LIBRARY])
def test_the_library_imports_neither_the_trainer_nor_the_toy_world(path):
    bad = [m for m in _absolute_imports(path)
           if m.split(".")[0] in ("svdiff_trainer", "svdiff_toyworld", "train_dreambooth", "pipelines", "benchmarks")]
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("path", TRAINER, ids=[str(p.relative_to(ROOT)) for p in TRAINER])
def test_the_trainer_never_imports_the_toy_world(path):
    bad = [m for m in _absolute_imports(path) if m.split(".")[0] == "svdiff_toyworld"]
    assert not bad and not _relative_escapes(path, ROOT / "trainer" / "svdiff_trainer"), f"{path} imports {bad}"


def _wheel(project: Path, out: Path, parts=None) -> zipfile.ZipFile:
    """The wheel of ``project`` (only ``parts`` of it, else all), built from a copy so the tree gets no build/."""
    import shutil

    source = out / "source"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for part in parts or [p.name for p in project.iterdir()]:
        src, dst = project / part, source / part
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300, cwd=out)
    return zipfile.ZipFile(next(out.glob("*.whl")))


def test_the_library_wheel_holds_no_model_weights_and_no_file_over_one_mib(tmp_path):
    wheel = _wheel(ROOT, tmp_path, ['pyproject.toml', 'README.md', 'svdiff_tools'])
    sizes = {i.filename: i.file_size for i in wheel.infolist()}
    assert "svdiff_tools/layer.py" in sizes and "svdiff_tools/peft/config.py" in sizes
    assert not [n for n in sizes if n.split("/")[0] in ("svdiff_trainer", "svdiff_toyworld")]
    assert not [n for n in sizes if n.endswith((".safetensors", ".bin", ".png"))]
    assert max(sizes.values()) < 2 ** 20, max(sizes.items(), key=lambda kv: kv[1])


def test_the_trainer_and_toy_world_wheels_carry_their_script_data_and_entry_point(tmp_path):
    (tmp_path / "trainer").mkdir(), (tmp_path / "toyworld").mkdir()
    trainer = _wheel(ROOT / "trainer", tmp_path / "trainer").namelist()
    assert "svdiff_trainer/dreambooth.py" in trainer and "svdiff_trainer/data/example_subject/example_toy_0.png" in trainer
    toy = _wheel(ROOT / "toyworld", tmp_path / "toyworld")
    names = toy.namelist()
    assert "svdiff_toyworld/data/pipeline/unet/diffusion_pytorch_model.safetensors" in names
    assert "svdiff_toyworld/data/metric/model.safetensors" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "[svdiff_trainer.presets]" in toy.read(entry).decode()
    assert "toyworld = svdiff_toyworld.preset:PRESET" in toy.read(entry).decode()


PLUGIN = '''
from pathlib import Path
from svdiff_trainer.presets import Preset
from svdiff_trainer.tiny import tiny_pipeline_path

PRESET = Preset(name="mine", title="my base", pipeline_folder=lambda: tiny_pipeline_path("sd15"),
                load_lines=["pipe = mine()"], defaults=lambda method: dict(resolution=48, max_train_steps=7),
                subject=lambda steps, guidance, resolution: dict(instance_data_dir={data!r},
                                                                 instance_prompt="a photo of zwx toy"),
                priority=99)
'''


def _plugin_env(tmp_path: Path, entries: list) -> dict:
    """A preset package ``my_preset`` and a dist-info that registers ``entries`` in the group, on PYTHONPATH."""
    from svdiff_trainer.presets import EXAMPLE_DATA

    (tmp_path / "my_preset.py").write_text(PLUGIN.format(data=str(EXAMPLE_DATA)))
    info = tmp_path / "my_preset-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-preset\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[svdiff_trainer.presets]\n" + "\n".join(entries) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "SVDIFF_TOOLS_EMBEDDED"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


SCENARIOS = textwrap.dedent("""
    import os
    from svdiff_trainer.args import TrainingInputError, parse_args

    def show(env, *flags):
        os.environ.pop("SVDIFF_TOOLS_EMBEDDED", None)
        os.environ.update(env)
        try:
            a = parse_args(list(flags) + ["--method", "svdiff"])
        except TrainingInputError as exc:
            print("refused:", exc)
            return
        print(a.model.embedded_kind, a.data.resolution, a.optim.max_train_steps, a.validation.num_inference_steps,
              a.data.instance_prompt)

    show({})
    show({}, "--resolution", "40")
    show({"SVDIFF_TOOLS_EMBEDDED": "tiny"})
    show({"SVDIFF_TOOLS_EMBEDDED": "nosuch"})
""")


def test_a_preset_plugs_in_through_its_entry_point_alone_and_a_broken_one_stops_nothing(tmp_path):
    """A package registers a preset by its entry point alone: its priority wins over the toy world's, its defaults
    and its subject fill what the user left unset, the user's flag and ``$SVDIFF_TOOLS_EMBEDDED`` still win; a
    preset that fails to load is skipped with a warning, an unknown name is refused in one sentence."""
    env = _plugin_env(tmp_path, ["mine = my_preset:PRESET", "broken = my_preset:NOT_THERE"])
    done = subprocess.run([sys.executable, "-c", SCENARIOS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "mine 48 7 25 a photo of zwx toy"
    assert lines[1] == "mine 40 7 25 a photo of zwx toy"
    assert lines[2] == "tiny 32 12 4 a photo of sks toy"
    assert lines[3].startswith("refused: SVDIFF_TOOLS_EMBEDDED='nosuch' names no installed preset; installed: ")
    assert "broken" not in lines[3] and "mine" in lines[3] and "tiny" in lines[3]
    assert "preset broken (my_preset:NOT_THERE) did not load" in done.stderr
