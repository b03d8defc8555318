"""LoRA export key formats, export from a file, and argument checks."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import svdiff_tools as st
from svdiff_tools.model import adapter_layers

from conftest import MODEL_CASES
from reference import delta64, randomize_adapter

UNET = next(c for c in MODEL_CASES if c.name == "unet")
CLIP = next(c for c in MODEL_CASES if c.name == "clip_text")


def _adapted(case, **kwargs):
    base = case.build(0)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(target_modules=case.targets, **kwargs))
    randomize_adapter(model)
    return base, model


def test_diffusers_keys_have_the_component_prefix(tmp_path):
    _, unet = _adapted(UNET, method="svfit", rank=2)
    st.export_lora(unet, tmp_path / "u.safetensors")
    keys = load_file(str(tmp_path / "u.safetensors")).keys()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    _, clip = _adapted(CLIP, method="svfit", rank=2)
    st.export_lora(clip, tmp_path / "t.safetensors")
    assert all(k.startswith("text_encoder.") for k in load_file(str(tmp_path / "t.safetensors")))


def test_kohya_keys_alpha_and_conv_shapes(tmp_path):
    _, unet = _adapted(UNET, method="vectorfit")
    report = st.export_lora(unet, tmp_path / "k.safetensors", key_format="kohya", rank=3)
    sd = load_file(str(tmp_path / "k.safetensors"))
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{stem}.lora_down.weight"].shape == (3, 16, 3, 3)
    assert sd[f"{stem}.lora_up.weight"].shape == (16, 3, 1, 1)
    assert float(sd[f"{stem}.alpha"]) == 1.0  # one alpha for every pair (see export.KOHYA_ALPHA)
    assert any("bias delta (kohya LoRA has no bias)" in d for d in report.dropped)
    # what a kohya consumer adds, (alpha / rank) * lora_up @ lora_down, is the optimal rank-3 approximation
    layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    D = delta64(layer, "default")
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    up, down = sd[f"{stem}.lora_up.weight"].double().reshape(16, 3), sd[f"{stem}.lora_down.weight"].double()
    approx = float(sd[f"{stem}.alpha"]) / 3 * up @ down.reshape(3, -1)
    assert (approx - best).norm() / best.norm() < 1e-5


def test_kohya_text_encoder_prefix(tmp_path):
    _, clip = _adapted(CLIP, method="svdiff")
    st.export_lora(clip, tmp_path / "k.safetensors", key_format="kohya")
    keys = load_file(str(tmp_path / "k.safetensors")).keys()
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


def test_export_from_file_with_base_leaves_base_clean(tmp_path):
    base, unet = _adapted(UNET, method="svft", svft_pattern="banded")
    path = st.save_adapter(unet, tmp_path / "a.safetensors")
    direct = st.export_lora(unet, tmp_path / "direct.safetensors")
    target = copy.deepcopy(base)
    from_file = st.export_lora(path, tmp_path / "from_file.safetensors", base=target)
    assert not any(isinstance(m, st.SVDLayer) for m in target.modules())
    assert from_file.ranks == direct.ranks
    a, b = load_file(str(tmp_path / "direct.safetensors")), load_file(str(tmp_path / "from_file.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    with safe_open(str(tmp_path / "direct.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_export_arguments_are_checked(tmp_path):
    _, unet = _adapted(UNET, method="svdiff")
    with pytest.raises(st.SVDAdapterError, match="key_format='comfy' is not supported"):
        st.export_lora(unet, tmp_path / "x.safetensors", key_format="comfy")
    with pytest.raises(st.SVDAdapterError, match="rank=0 must be None"):
        st.export_lora(unet, tmp_path / "x.safetensors", rank=0)
    with pytest.raises(st.SVDAdapterError, match="needs base="):
        st.export_lora(str(tmp_path / "a.safetensors"), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_report_lists_every_layer():
    _, unet = _adapted(UNET, method="svfit", rank=2)
    report = st.export_lora(unet, None)
    assert set(report.ranks) == {n for n, _ in adapter_layers(unet)}
    assert "overall relative Frobenius error" in str(report)
