"""Issue 31 (reliability v3): no silent wrong result through metadata; canonical files.

Each test names the item of the issue it covers. The PEFT route (items 2, 10-14) is in test_peft_conformance.py,
the trainer's items (3-5, 7, 9) in test_trainer_reliability.py.
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import svdiff_tools as st

from reference import randomize_adapter


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 8))


def _saved(tmp_path, **config):
    model = _model()
    config = {"method": "svfit", "rank": 4, "target_modules": ["0", "2"], "svd_driver": "randomized", **config}
    st.inject_adapter(model, st.SVDAdapterConfig(**config))
    randomize_adapter(model, seed=1)
    return model, st.save_adapter(model, tmp_path / "a.safetensors")


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n


def _edit_header_bytes(path, old: bytes, new: bytes):
    """Edit the file as a user with a text or hex editor would: the same bytes replaced in the header, in place."""
    raw, n = _header(path)
    head = raw[8:8 + n]
    assert head.count(old) >= 1, (old, head[:400])
    assert len(old) == len(new)
    path.write_bytes(raw[:8] + head.replace(old, new, 1) + raw[8 + n:])


# ------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("edit", ["scale", "svd_rank", "driver", "weight_dtype", "adapter_name", "rank"])
def test_an_edited_metadata_field_is_refused(tmp_path, edit):
    """Item 1: one checksum covers the payload and every metadata field; any edit is refused in one sentence that
    names the file, and the model is left as it was."""
    model, path = _saved(tmp_path, **({"svd_driver": "full", "rank": None, "method": "svdiff"}
                                      if edit == "driver" else {}))
    x = torch.randn(5, 24)
    old, new = {
        "scale": (b'\\"scale\\":1.0', b'\\"scale\\":9.0'),
        "svd_rank": (b'\\"svd_rank\\":4', b'\\"svd_rank\\":5'),
        "driver": (b'\\"driver\\":\\"full\\"', b'\\"driver\\":\\"gram\\"'),
        "weight_dtype": (b'float32', b'float64'),
        "adapter_name": (b'"adapter_name":"default"', b'"adapter_name":"defauly"'),
        "rank": (b'\\"rank\\":4', b'\\"rank\\":3'),
    }[edit]
    raw = path.read_bytes()
    _edit_header_bytes(path, old.replace(b":", b": ") if old not in raw else old,
                       new.replace(b":", b": ") if old not in raw else new)
    target = _model()
    before = target(x)
    with pytest.raises(st.SVDAdapterFileError, match="metadata fails its checksum") as info:
        st.load_adapter(target, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not st.get_adapter_names(target) and torch.equal(target(x), before)


def test_the_unedited_file_loads_and_reproduces_the_model(tmp_path):
    """Item 1, the other side: the checksum does not refuse an intact file; outputs are the saved model's."""
    model, path = _saved(tmp_path)
    x = torch.randn(5, 24)
    target = _model()
    st.load_adapter(target, path)
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=1e-6)


def test_version_2_files_load_with_one_warning(tmp_path, caplog):
    """Item 1: files written before the metadata checksum (format version 2) still load, and say once that their
    metadata is unprotected."""
    from svdiff_tools.io import checksums

    model, path = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksum"]
    meta["format_version"] = "2"
    assert json.loads(meta["checksums"]) == json.loads(checksums(tensors))
    old = tmp_path / "v2.safetensors"
    save_file(tensors, str(old), metadata=meta)
    x = torch.randn(5, 24)
    with caplog.at_level(logging.WARNING, logger="svdiff_tools.io"):
        for _ in range(2):
            target = _model()
            st.load_adapter(target, old)
    warnings = [r for r in caplog.records if "format version 2" in r.getMessage()]
    assert len(warnings) == 1 and str(old) in warnings[0].getMessage()
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ item 8
_SAVE_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import svdiff_tools as st
    from svdiff_tools.atomic import save_safetensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 8))
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", target_modules=["0", "2"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).reshape(p.shape))
    st.save_adapter(model, sys.argv[1], extra_metadata={"z": "1", "a": "2", "m": "3"})
    save_safetensors({"b": torch.zeros(3), "a": torch.ones(2)}, sys.argv[2], {"z": "1", "a": "2", "m": "3"})
""")


def test_identical_content_gives_identical_bytes_in_every_process(tmp_path):
    """Item 8: safetensors writes its metadata in a per-process hash order; our files are canonical, so the same
    adapter saved by different processes is byte-identical (users hash and diff adapter files)."""
    outputs = []
    for i in range(3):
        a, b = tmp_path / f"adapter{i}.safetensors", tmp_path / f"plain{i}.safetensors"
        subprocess.run([sys.executable, "-c", _SAVE_IN_A_FRESH_PROCESS, str(a), str(b)], check=True,
                       env={"PYTHONHASHSEED": str(i), "PATH": "/usr/bin:/bin",
                            "SVDIFF_TOOLS_CACHE": str(tmp_path / "cache")})
        outputs.append((a.read_bytes(), b.read_bytes()))
    assert all(o == outputs[0] for o in outputs[1:])
    for raw in outputs[0]:
        (n,) = struct.unpack("<Q", raw[:8])
        header = raw[8:8 + n]
        assert n % 8 == 0 and header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode(
            ).ljust(n)
    with safe_open(str(tmp_path / "plain0.safetensors"), "pt") as f:  # still a valid file for safetensors
        assert f.metadata() == {"z": "1", "a": "2", "m": "3"} and torch.equal(f.get_tensor("a"), torch.ones(2))
