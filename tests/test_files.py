"""Adapter files: every refusal is one clear sentence and leaves the model exactly as it was."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import svdiff_tools as st
from svdiff_tools import decomposition as dec
from svdiff_tools.fingerprint import sample_positions

from conftest import MODEL_CASES
from reference import randomize_adapter

UNET = next(c for c in MODEL_CASES if c.name == "unet")
CLIP = next(c for c in MODEL_CASES if c.name == "clip_text")


@pytest.fixture
def saved(tmp_path):
    base = UNET.build(0)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", target_modules="unet"))
    randomize_adapter(model)
    return base, model, st.save_adapter(model, tmp_path / "adapter.safetensors")


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    types, state = snap
    now = model.state_dict()
    return [type(m) for m in model.modules()] == types and now.keys() == state.keys() and all(
        torch.equal(now[k], state[k]) for k in state)


def _rewrite(path, out, tensors=None, **metadata_changes):
    """A crafted file: changed tensors and metadata get matching checksums, so the deeper checks are what refuses it."""
    from svdiff_tools.io import checksums, metadata_checksum

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata_changes)
    if tensors is not None:
        meta["checksums"] = checksums(tensors)
    meta["checksum"] = metadata_checksum(meta)
    save_file(tensors if tensors is not None else data, str(out), metadata=meta)
    return out


def test_folder_paths_use_the_default_file_name(saved, tmp_path):
    base, model, _ = saved
    folder = tmp_path / "run"
    path = st.save_adapter(model, folder)
    assert path == folder / "svd_adapter.safetensors"
    fresh = copy.deepcopy(base)
    st.load_adapter(fresh, folder)
    torch.testing.assert_close(UNET.run(fresh), UNET.run(model))


@pytest.mark.parametrize("case_name", ["linear", "clip_text"])
def test_svft_reloads_with_the_same_outputs_from_float64_decompositions(case_name, tmp_path):
    """The loader recomputes the SVD in float64 (another library, another device): thanks to the sign rule
    off-diagonal SVFT entries still meet the same vectors."""
    case = next(c for c in MODEL_CASES if c.name == case_name)
    base = case.build(0)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", target_modules=case.targets))
    randomize_adapter(model)
    path = st.save_adapter(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    st.load_adapter(fresh, path, svd_dtype="float64", basis_storage="both")
    out, expected = case.run(fresh), case.run(model)
    assert float((out - expected).norm() / expected.norm()) < 2e-5
    # without the sign rule, flipping one pair would change the outputs visibly (both factors are stored: a
    # one-sided basis derives V from U, so flipping u_0 there flips v_0 with it)
    layer = next(m for m in fresh.modules() if isinstance(m, st.SVDLayer))
    basis = next(iter(layer.bases.values()))
    basis.U[:, 0] *= -1
    basis.V[:, 0] *= -1
    assert float((case.run(fresh) - expected).norm() / expected.norm()) > 1e-3


@pytest.mark.parametrize("case", ["missing", "empty_folder", "lora", "arch", "version", "metadata", "stray",
                                  "shape", "nan", "indices", "option"])
def test_refusals(saved, tmp_path, case):
    base, model, path = saved
    target = copy.deepcopy(base)
    snap = _snapshot(target)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(k for k in tensors if k.endswith(".values"))[0]
    kwargs = {}
    if case == "missing":
        bad, match = tmp_path / "nope.safetensors", "does not exist"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        bad, match = tmp_path / "empty", "has no svd_adapter.safetensors"
    elif case == "lora":
        bad = tmp_path / "lora.safetensors"
        st.export_lora(model, bad)
        match = "is a LoRA file, not an SVD adapter; load it with diffusers' load_lora_weights"
    elif case == "arch":
        target = CLIP.build(0)
        snap = _snapshot(target)
        bad, match = path, "which this model does not have; it was trained for another architecture"
    elif case == "version":
        bad, match = _rewrite(path, tmp_path / "v.safetensors", format_version="99"), "upgrade svdiff-tools"
    elif case == "metadata":
        bad, match = _rewrite(path, tmp_path / "m.safetensors", components="{not json"), "damaged metadata"
    elif case == "stray":
        bad = _rewrite(path, tmp_path / "s.safetensors", tensors=dict(tensors, **{"conv_in.extra": torch.zeros(1)}))
        match = "holds tensor conv_in.extra that belongs to no adapted module"
    elif case == "shape":
        bad = _rewrite(path, tmp_path / "sh.safetensors", tensors=dict(tensors, **{first: torch.zeros(3)}))
        match = f"tensor {first} has shape \\[3\\]"
    elif case == "nan":
        bad = _rewrite(path, tmp_path / "n.safetensors",
                       tensors=dict(tensors, **{first: torch.full_like(tensors[first], float("nan"))}))
        match = "holds NaN or inf; the training run diverged"
    elif case == "indices":
        rows = first[: -len("values")] + "rows"
        bad = _rewrite(path, tmp_path / "i.safetensors", tensors=dict(tensors, **{rows: tensors[rows] + 1000}))
        match = "SVFT indices .* fall outside its rank"
    else:
        bad, match, kwargs = path, "load options \\['rank'\\] are unknown", {"rank": 3}
    with pytest.raises(st.SVDAdapterError, match=match) as info:
        st.load_adapter(target, bad, **kwargs)
    assert "\n" not in str(info.value)
    assert _same(target, snap)


def test_failure_during_decomposition_leaves_the_model_untouched(saved, monkeypatch):
    base, model, path = saved
    target = copy.deepcopy(base)
    snap = _snapshot(target)
    calls = {"n": 0}
    real = dec.decompose

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated out-of-memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(dec, "decompose", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        st.load_adapter(target, path)
    assert _same(target, snap)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="simulated"):
        st.inject_adapter(target, st.SVDAdapterConfig(target_modules="unet"))
    assert _same(target, snap)


def test_failure_while_attaching_rolls_back(saved, monkeypatch):
    base, _, path = saved
    target = copy.deepcopy(base)
    snap = _snapshot(target)
    from svdiff_tools import layer as layer_mod

    real = layer_mod.SVDLayer.add_adapter
    count = {"n": 0}

    def failing(self, *a, **k):
        count["n"] += 1
        if count["n"] == 7:
            raise KeyboardInterrupt  # even an interrupt mid-way leaves no half-patched model
        return real(self, *a, **k)

    monkeypatch.setattr(layer_mod.SVDLayer, "add_adapter", failing)
    with pytest.raises(KeyboardInterrupt):
        st.load_adapter(target, path)
    assert _same(target, snap)
    assert st.get_adapter_names(target) == []


def test_a_crash_while_saving_keeps_the_previous_file(saved, monkeypatch):
    _, model, path = saved
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    import svdiff_tools.atomic as atomic_mod

    monkeypatch.setattr(atomic_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        st.save_adapter(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.safetensors"]


def test_metadata_is_complete(saved):
    _, model, path = saved
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "svdiff-tools.adapter" and meta["format_version"] == "3"
    entry = json.loads(meta["components"])[""]
    assert entry["config"]["method"] == "svft" and entry["config"]["svft_pattern"] == "banded"
    info = entry["modules"]["down_blocks.0.resnets.0.conv1"]
    assert info["kind"] == "conv" and info["weight_shape"] == [16, 16, 3, 3]
    assert info["weight_dtype"] == "float32" and info["driver"] == "gram"
    assert set(info["fingerprint"]) == {"shape", "norm", "sum", "samples"}
    weight = model.get_submodule("down_blocks.0.resnets.0.conv1").unmerged_weight().double()
    fp = info["fingerprint"]  # six significant digits of the float64 figures
    for recorded, exact in [(fp["norm"], weight.norm()), (fp["sum"], weight.sum())] + \
            [(v, weight.reshape(-1)[i]) for v, i in zip(fp["samples"], sample_positions(weight.numel()))]:
        assert abs(recorded - float(exact)) <= 5e-6 * abs(float(exact)) and float(f"{recorded:.6g}") == recorded
    assert "out_channels, -1" in meta["conv_reshape"]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_outputs_written_whole_or_not_at_all(tmp_path, monkeypatch, kind):
    """Model cards, reports, grids and validation images (`atomic.write_text`, `atomic.save_image`): a write killed
    midway leaves the previous file byte for byte and no temporary file."""
    from PIL import Image

    from svdiff_tools import atomic

    target = tmp_path / ("README.md" if kind == "text" else "grid.png")
    first, second = ("card one\n", "card two\n") if kind == "text" else \
        (Image.new("RGB", (4, 4), (200, 10, 10)), Image.new("RGB", (4, 4), (10, 200, 10)))

    def write(content):
        return atomic.write_text(target, content) if kind == "text" else atomic.save_image(content, target)

    write(first)
    before = target.read_bytes()
    if kind == "text":
        assert target.read_text() == "card one\n"
    else:
        assert Image.open(target).format == "PNG" and Image.open(target).getpixel((0, 0)) == (200, 10, 10)
    cls, name = (Path, "write_text") if kind == "text" else (Image.Image, "save")

    def killed_midway(self, fp=None, *a, **k):
        Path(self if kind == "text" else fp).write_bytes(before[:5])
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, name, killed_midway)
    with pytest.raises(KeyboardInterrupt):
        write(second)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    write(second)
    assert target.read_bytes() != before
    with pytest.raises(ValueError, match="unknown image suffix"):
        atomic.save_image(Image.new("RGB", (2, 2)), tmp_path / "grid.xyz")
