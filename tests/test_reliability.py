"""Issue 11: no silent wrong result, no lost state, no crash from the cache (core and file items).

Each test names the item it covers. Trainer items (1, 11, 12) live in test_trainer_runs.py.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import svdiff_tools as st
from svdiff_tools import cache, decomposition

from reference import randomize_adapter, rel_err


def _gpt2_conv1d(i, o):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(o, i)


# ------------------------------------------------------------------------------------------ item 5
# (name, module factory, input factory): out > in and out < in for every kind that has both orientations
KIND_CASES = [
    ("linear_wide", lambda: nn.Linear(48, 16), lambda: torch.randn(3, 5, 48)),
    ("linear_tall", lambda: nn.Linear(16, 48), lambda: torch.randn(3, 5, 16)),
    ("conv1d", lambda: nn.Conv1d(12, 20, 3, padding=1), lambda: torch.randn(2, 12, 9)),
    ("conv2d_3x3_narrow", lambda: nn.Conv2d(12, 8, 3, padding=1), lambda: torch.randn(2, 12, 6, 6)),
    ("conv2d_3x3_wide", lambda: nn.Conv2d(4, 40, 3, padding=1), lambda: torch.randn(2, 4, 6, 6)),
    ("conv2d_1x1_tall", lambda: nn.Conv2d(8, 24, 1), lambda: torch.randn(2, 8, 5, 5)),
    ("conv2d_1x1_wide", lambda: nn.Conv2d(24, 8, 1), lambda: torch.randn(2, 24, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(4, 6, 2), lambda: torch.randn(1, 4, 4, 4, 4)),
    ("embedding", lambda: nn.Embedding(30, 12), lambda: torch.randint(0, 30, (3, 7))),
    ("gpt2_conv1d_tall", lambda: _gpt2_conv1d(8, 24), lambda: torch.randn(2, 5, 8)),
    ("gpt2_conv1d_wide", lambda: _gpt2_conv1d(24, 8), lambda: torch.randn(2, 5, 24)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("storage", ["both", "one_sided"])
@pytest.mark.parametrize("mode", ["recompose", "factored", "auto"])
@pytest.mark.parametrize("case", KIND_CASES, ids=[c[0] for c in KIND_CASES])
@pytest.mark.parametrize("method", ["svdiff", "vectorfit", "svft"])
def test_identity_at_init_is_bit_exact_on_every_path(case, mode, storage, dtype, method):
    """Item 5: at M = 0 every path, storage, kind and dtype returns exactly what the base module returns."""
    _, make, inputs = case
    torch.manual_seed(0)
    base = nn.Sequential(make()).to(dtype)
    x = inputs()
    x = x.to(dtype) if x.is_floating_point() else x
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method=method, target_modules=["0"], forward_mode=mode,
                                                 basis_storage=storage))
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    layer = model[0]
    if storage == "one_sided" and layer.kind.name != "embedding":
        assert any(b.head for b in layer.bases.values()) or mode == "factored"


# ------------------------------------------------------------------------------------------ item 2
def _linear(seed=0, i=64, o=48):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(i, o))


@pytest.mark.parametrize("second", [dict(method="svfit", rank=3), dict(method="svft", svft_pattern="banded",
                                                                      svd_driver="full")])
def test_adapter_loaded_or_injected_while_another_is_merged_uses_the_unmerged_weight(second, tmp_path):
    """Item 2: a basis decomposed for a second adapter while the first is merged comes from the unmerged weight."""
    base = _linear()
    clean = copy.deepcopy(base)
    st.inject_adapter(clean, st.SVDAdapterConfig(target_modules=["0"], **second), adapter_name="b")
    randomize_adapter(clean, seed=3)
    path = st.save_adapter(clean, tmp_path / "b.safetensors", adapter_name="b")

    merged = copy.deepcopy(base)
    st.inject_adapter(merged, st.SVDAdapterConfig(method="svdiff", target_modules=["0"]), adapter_name="a")
    randomize_adapter(merged, seed=4)
    st.merge_adapter(merged, ["a"])
    st.load_adapter(merged, path)
    expected = clean[0].delta_matrix(["b"]).detach()
    assert rel_err(merged[0].delta_matrix(["b"]).detach(), expected) < 1e-5
    # the same for a fresh injection (what training does): same basis as on the clean base
    st.inject_adapter(merged, st.SVDAdapterConfig(target_modules=["0"], **second), adapter_name="c")
    U_c, V_c = merged[0].factors("c")
    U_b, V_b = clean[0].factors("b")
    assert rel_err(U_c, U_b) < 1e-5 and rel_err(V_c, V_b) < 1e-5


# ------------------------------------------------------------------------------------------ items 3, 4
def _entries():
    return sorted(p for p in cache.cache_dir().glob("*.safetensors"))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDIFF_TOOLS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _adapted(seed=0, **kw):
    model = _linear(seed)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", target_modules=["0"],
                                                 svd_driver="full", **kw))
    return model


def test_cache_hits_are_copied_into_memory(own_cache):
    """Item 3: editing or truncating a cache entry after it was read never reaches a live model."""
    _adapted()  # fills the cache
    (entry,) = _entries()
    model = _adapted()  # a hit
    randomize_adapter(model, seed=5)
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
    raw = bytearray(entry.read_bytes())
    raw[-4000:] = os.urandom(4000)  # in place, as cp / rsync --inplace would
    with open(entry, "r+b") as fh:
        fh.write(raw)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with open(entry, "r+b") as fh:
        fh.truncate(100)  # a memory-mapped reader would die with SIGBUS here
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("poison", ["other_layer", "nan", "shape", "garbage"])
def test_bad_cache_entries_are_recomputed_with_one_warning(own_cache, poison, caplog):
    """Item 4: a hit is checked against the weight; a bad one is replaced, with one warning."""
    reference = _adapted(seed=0)[0]
    (entry,) = _entries()
    _adapted(seed=1)  # another layer of the same shape: its own entry
    other = next(p for p in _entries() if p != entry)
    good = load_file(str(entry))
    if poison == "other_layer":
        entry.write_bytes(other.read_bytes())
    elif poison == "nan":
        save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()}, str(entry))
    elif poison == "shape":
        save_file({k: v[:-1].contiguous() for k, v in good.items()}, str(entry))
    else:
        entry.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        model = _adapted(seed=0)
    warnings = [r for r in caplog.records if "cache entry" in r.getMessage()]
    assert len(warnings) == 1
    basis, ref_basis = next(iter(model[0].bases.values())), next(iter(reference.bases.values()))
    assert torch.equal(basis.U, ref_basis.U) and torch.equal(basis.S, ref_basis.S)
    assert decomposition.check_entry(model[0].base_module.weight, load_file(str(entry)), None,
                                     torch.float32) is None  # rewritten


def test_cache_keys_carry_the_algorithm_version(own_cache):
    _adapted()
    (entry,) = _entries()
    assert f"-v{decomposition.ALGORITHM_VERSION}-" in entry.name


def test_an_unwritable_cache_warns_once(tmp_path, monkeypatch, caplog):
    """Item 11: a cache folder that cannot be written costs speed and one warning, not one per layer."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SVDIFF_TOOLS_CACHE", str(blocker / "cache"))  # under a file: never writable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 8))
    with caplog.at_level(logging.WARNING):
        st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules=["0", "1", "2"]))
    assert len([r for r in caplog.records if "cache" in r.getMessage()]) == 1


# ------------------------------------------------------------------------------------------ item 6
BAD_SCALES = [float("nan"), float("inf"), -float("inf"), "0.5", True, None, [1.0]]


@pytest.mark.parametrize("bad", BAD_SCALES, ids=repr)
def test_scales_must_be_finite_numbers(bad, tmp_path):
    model = _adapted()
    path = st.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(st.SVDConfigError, match="must be a finite number"):
        st.SVDAdapterConfig(scale=bad)
    with pytest.raises(st.SVDConfigError, match="must be a finite number"):
        st.set_adapter_scale(model, "default", bad)
    with pytest.raises(st.SVDConfigError, match="must be a finite number"):
        st.set_active_adapters(model, ["default"], weights=[bad])
    with pytest.raises(st.SVDAdapterError, match="must be a finite number"):
        st.load_adapter(_linear(), path, adapter_name="x", scale=bad)
    with pytest.raises(st.SVDConfigError, match="must be a finite number"):
        st.merge_adapter(model, scale=bad)
    assert model[0].scales == {"default": 1.0} and not model[0].merged


@pytest.mark.parametrize("scale", [1e30, -3e38])
def test_a_merge_that_would_overflow_changes_nothing(scale):
    model = _adapted()
    randomize_adapter(model, seed=2)
    weight = model[0].base_module.weight.detach().clone()
    with pytest.raises(st.SVDAdapterError, match="(non-finite|under rounding).*nothing was merged"):
        st.merge_adapter(model, scale=scale)
    assert torch.equal(model[0].base_module.weight, weight) and not model[0].merged
    st.merge_adapter(model)  # a sane merge still works, and removing the adapter restores the weight
    st.remove_adapter(model)
    torch.testing.assert_close(model[0].weight, weight, rtol=0, atol=1e-6)


def test_fp16_overflow_is_refused_too():
    model = _adapted().half()
    randomize_adapter(model, seed=2)
    with pytest.raises(st.SVDAdapterError, match="non-finite"):
        st.merge_adapter(model, scale=1e6)


# ------------------------------------------------------------------------------------------ item 7
def _saved(tmp_path):
    model = _adapted()
    randomize_adapter(model, seed=1)
    return model, st.save_adapter(model, tmp_path / "a.safetensors")


def _payload_offset(path):
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


@pytest.mark.parametrize("flip", ["exponent", "low_bit"])
def test_a_changed_byte_in_the_payload_is_refused(tmp_path, flip):
    model, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    start = _payload_offset(path)
    header = json.loads(raw[8:start].decode())
    key = next(k for k in header if k.endswith(".values"))
    begin = start + header[key]["data_offsets"][0]
    if flip == "exponent":
        raw[begin + 3] ^= 0x40  # float32 exponent bit: 1e-2 -> ~1e37
    else:
        raw[begin] ^= 0x01
    path.write_bytes(bytes(raw))
    target = _linear()
    with pytest.raises(st.SVDAdapterFileError, match="fails its checksum"):
        st.load_adapter(target, path)
    assert not st.get_adapter_names(target)


@pytest.mark.parametrize("case", ["int32", "stray", "empty", "no_checksums"])
def test_crafted_payloads_are_refused(tmp_path, case):
    from svdiff_tools.io import checksums, metadata_checksum

    model, path = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".values"))
    if case == "int32":
        tensors[key] = tensors[key].to(torch.int32)
        match = "has dtype torch.int32, expected a float32, float16, bfloat16, float64 tensor"
    elif case == "stray":
        tensors["0.extra"] = torch.zeros(3)
        match = "holds tensor 0.extra that belongs to no adapted module"
    elif case == "empty":
        tensors = {}
        entry = json.loads(meta["components"])
        entry[""]["modules"] = {}
        meta["components"] = json.dumps(entry)
        match = "adapts no module"
    else:
        del meta["checksums"]
        match = "lacks its tensor checksums"
    if case != "no_checksums":
        meta["checksums"] = checksums(tensors)
    meta["checksum"] = metadata_checksum(meta)  # re-signed: the deeper checks are what refuses it
    save_file(tensors, str(path), metadata=meta)
    target = _linear()
    with pytest.raises(st.SVDAdapterFileError, match=match):
        st.load_adapter(target, path)
    assert not st.get_adapter_names(target)


# ------------------------------------------------------------------------------------------ items 11, 12: metadata
@pytest.mark.parametrize("field,value,match", [
    ("rank", None, "rank None"), ("rank", "abc", "rank 'abc'"), ("rank", True, "rank True"),
    ("svd_rank", None, "svd_rank None"), ("weight_shape", "x", "weight_shape"),
    ("fingerprint_norm", float("nan"), "not finite"), ("fingerprint_samples", [], "fingerprint samples"),
    ("scale", "x", "config"),
])
def test_damaged_metadata_values_raise_the_file_error(tmp_path, field, value, match):
    from svdiff_tools.io import metadata_checksum

    model = _linear()
    st.inject_adapter(model, st.SVDAdapterConfig(method="svfit", rank=3, target_modules=["0"],
                                                 svd_driver="randomized"))
    path = st.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    comps = json.loads(meta["components"])
    record = comps[""]["modules"]["0"]
    if field == "scale":
        comps[""]["config"]["scale"] = value
    elif field.startswith("fingerprint_"):
        record["fingerprint"][field.split("_")[1]] = value
    else:
        record[field] = value
    meta["components"] = json.dumps(comps)
    meta["checksum"] = metadata_checksum(meta)  # re-signed: the value checks are what refuses it
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(st.SVDAdapterFileError, match=match) as info:
        st.load_adapter(_linear(), path)
    assert "\n" not in str(info.value)


def test_removing_an_unknown_adapter_is_an_error():
    model = _adapted()
    with pytest.raises(st.SVDTargetError, match="no adapter named 'nope'"):
        st.remove_adapter(model, "nope")
    assert st.get_adapter_names(model) == ["default"]


# ------------------------------------------------------------------------------------------ item 8
def test_disabled_means_the_base_output_even_when_merged():
    base = _linear()
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="vectorfit", target_modules=["0"]))
    randomize_adapter(model, seed=6)
    x = torch.randn(5, 64)
    with torch.no_grad():
        adapted, plain = model(x), base(x)
        st.merge_adapter(model)
        with st.adapters_disabled(model):
            torch.testing.assert_close(model(x), plain, rtol=0, atol=2e-6)
        assert rel_err(model(x), adapted) < 1e-6
        st.disable_adapters(model)
        torch.testing.assert_close(model(x), plain, rtol=0, atol=2e-6)
        with pytest.raises(st.SVDAdapterError, match="adapters are disabled"):
            st.merge_adapter(model)
        st.enable_adapters(model)
        assert rel_err(model(x), adapted) < 1e-6


def test_disabled_norm_deltas_undo_their_merge():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules=["0"], train_norms=True))
    randomize_adapter(model, seed=1)
    with torch.no_grad():
        model[1].weight_deltas["default"].add_(0.3)
        st.merge_adapter(model)
        x = torch.randn(3, 8)
        with st.adapters_disabled(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------ item 9
def test_written_files_get_the_umask_mode(tmp_path, own_cache):
    old = os.umask(0o022)
    try:
        model = _adapted()
        randomize_adapter(model)
        files = [st.save_adapter(model, tmp_path / "a.safetensors")]
        st.export_lora(model, tmp_path / "lora.safetensors")
        files += [tmp_path / "lora.safetensors", *_entries()]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------ item 10
def test_bf16_load_is_as_good_as_casting(tmp_path, caplog):
    """Item 10: an fp32-trained adapter loaded into a bf16 model reproduces its effect about as well as casting
    the adapted fp32 model to bf16 does (both limited by the weights' rounding), and says so once."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(384, 384))
    with torch.no_grad():  # a pretrained-like decaying spectrum
        U, _ = torch.linalg.qr(torch.randn(384, 384))
        V, _ = torch.linalg.qr(torch.randn(384, 384))
        base[0].weight.copy_(U @ torch.diag(torch.linspace(2, 0.1, 384)) @ V.T)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules=["0"]))
    with torch.no_grad():
        model[0].svd_adapters["default"].delta.normal_(0, 0.05)
    path = st.save_adapter(model, tmp_path / "a.safetensors")
    x = torch.randn(64, 384)
    with torch.no_grad():
        effect = (model(x) - base(x)).double()
        base16 = copy.deepcopy(base).to(torch.bfloat16)
        plain16 = base16(x.bfloat16()).double()
        merged = copy.deepcopy(model)
        st.merge_adapter(merged)
        cast = st.remove_adapter(merged) or merged.to(torch.bfloat16)
        cast_err = rel_err(cast(x.bfloat16()).double() - plain16, effect)
        with caplog.at_level(logging.WARNING):
            st.load_adapter(base16, path)
        load_err = rel_err(base16(x.bfloat16()).double() - plain16, effect)
    assert load_err < 1.5 * cast_err and load_err < 0.1, (load_err, cast_err)
    assert len([r for r in caplog.records if "trained on float32 weights" in r.getMessage()]) == 1
