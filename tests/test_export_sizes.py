"""Issue 17: LoRA files users can ship (per-layer ranks without padding, energy ranks, honest sizes) and fused
exports for tools that read only full weights."""

import copy
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import svdiff_tools as st
from svdiff_tools.diffusers.components import pipeline_components
from svdiff_tools.layer import SVDLayer
from svdiff_tools.model import adapter_layers
from svdiff_trainer.tiny import tiny_pipeline, tiny_pipeline_path

from reference import delta64, randomize_adapter

ROOT = Path(__file__).resolve().parents[1]


def _run(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _adapted(kind="sd15", method="svdiff"):
    base = tiny_pipeline(kind)
    pipe = copy.deepcopy(base)
    for comp, model in pipeline_components(pipe).items():
        denoiser = comp in ("unet", "transformer")
        st.inject_adapter(model, st.SVDAdapterConfig(method=method, target_modules=comp if denoiser else "text-encoder"))
        randomize_adapter(model, seed=3, magnitude=0.3)
    return base, pipe


@pytest.mark.parametrize("key_format", ["diffusers", "kohya"])
def test_per_layer_ranks_without_padding_round_trip(tmp_path, key_format):
    """Each pair has its layer's own rank (SD-1.5's cross-attention to_k/to_v are narrower than the rest), the
    file weighs the sum of its pairs, and load_lora_weights reproduces the images."""
    base, adapted = _adapted()
    path = tmp_path / "lora.safetensors"
    report = st.export_lora(adapted, path, key_format=key_format)
    tensors = load_file(str(path))
    assert len(set(report.ranks.values())) > 1  # the layers really differ in rank
    expected = 0
    for label, rank in report.ranks.items():
        comp, name = label.split(".", 1)
        layer = pipeline_components(adapted)[comp].get_submodule(name)
        out_f, in_f = layer.kind.matrix_shape
        expected += rank * (out_f + in_f) * 4 + (4 if key_format == "kohya" else 0)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == expected
    assert report.file_bytes == path.stat().st_size and report.file_bytes < payload + 65536
    downs = [t for k, t in tensors.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))]
    assert sorted(t.shape[0] for t in downs) == sorted(report.ranks.values())
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(path))
    np.testing.assert_allclose(_run(pipe), _run(adapted), atol=2e-5)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_energy_rank_keeps_the_stated_energy_on_every_layer(tmp_path, fraction):
    _, adapted = _adapted()
    unet = adapted.unet
    report = st.export_lora(unet, tmp_path / "lora.safetensors", rank=fraction)
    for name, layer in adapter_layers(unet):
        if not isinstance(layer, SVDLayer):
            continue
        lam = torch.linalg.svdvals(delta64(layer, "default"))
        energy = torch.cumsum(lam.pow(2), 0) / lam.pow(2).sum()
        R = report.ranks[name]
        assert float(energy[R - 1]) >= fraction - 1e-9, name  # keeps at least the fraction
        assert R == 1 or float(energy[R - 2]) < fraction, name  # and is the smallest rank that does
        assert report.errors[name] <= (1 - fraction) ** 0.5 + 1e-9
    assert str(report).splitlines()[-1] == report.summary and "MiB" in report.summary


def test_an_export_larger_than_its_weights_warns_with_a_suggestion(tmp_path, caplog):
    _, adapted = _adapted()
    with caplog.at_level(logging.WARNING):
        report = st.export_lora(adapted.unet, tmp_path / "exact.safetensors")
    assert report.file_bytes > report.weight_bytes
    assert any("larger than the weights it modifies" in r.getMessage() and "rank=0.99" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        small = st.export_lora(adapted.unet, tmp_path / "small.safetensors", rank=0.5)
    assert small.file_bytes < report.file_bytes
    assert not any("larger than the weights" in r.getMessage() for r in caplog.records)


def test_bad_export_ranks_are_refused(tmp_path):
    _, adapted = _adapted()
    for bad in (0, -1, 1.5, 0.0, True, "0.9"):
        with pytest.raises(st.SVDAdapterError, match="energy fraction"):
            st.export_lora(adapted.unet, tmp_path / "x.safetensors", rank=bad)


def test_fused_pipeline_and_unet_file_reproduce_the_adapted_images(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = tiny_pipeline_path("sd15")
    base = StableDiffusionPipeline.from_pretrained(folder)
    adapted = copy.deepcopy(base)
    for comp, model in pipeline_components(adapted).items():
        st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff",
                                                     target_modules="unet" if comp == "unet" else "text-encoder"))
        randomize_adapter(model, seed=4, magnitude=0.3)
    adapter = adapted.save_svd_adapter(tmp_path / "adapter")
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "export.py"), "--adapter", str(adapter),
                             "--base", str(folder), "--fused", str(tmp_path / "fused"), "--unet_file",
                             str(tmp_path / "unet.safetensors")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert not any(isinstance(m, SVDLayer) for m in fused.unet.modules())
    np.testing.assert_allclose(_run(fused), _run(adapted), atol=2e-5)
    unet = UNet2DConditionModel.from_config(base.unet.config)
    unet.load_state_dict(load_file(str(tmp_path / "unet.safetensors")))  # strict: diffusers layout, nothing else
    only_unet = copy.deepcopy(base)
    only_unet.unet = unet
    reference = copy.deepcopy(adapted)
    reference.text_encoder = copy.deepcopy(base.text_encoder)  # the UNet file carries the UNet's part only
    np.testing.assert_allclose(_run(only_unet), _run(reference), atol=2e-5)


def test_merging_bias_deltas_where_there_is_no_bias_slot_says_so(caplog):
    """VectorFit trains bias deltas; diffusers' attention projections have no bias, so a saved fused UNet cannot
    keep them: merge_and_unload says so (the in-memory model keeps them)."""
    base = tiny_pipeline("sd15").unet
    unet = copy.deepcopy(base)
    st.inject_adapter(unet, st.SVDAdapterConfig(method="vectorfit", target_modules="unet-attention"))
    randomize_adapter(unet, seed=1)
    with caplog.at_level(logging.WARNING):
        st.merge_and_unload(unet)
    assert any("layers that had no bias" in r.getMessage() for r in caplog.records)
    assert not any(isinstance(m, SVDLayer) for m in unet.modules()) and unet.get_submodule(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").bias is not None


def test_the_size_benchmark_arithmetic_matches_a_real_file(tmp_path):
    """benchmarks/export_size.py computes SD-1.5 sizes from shapes; the same arithmetic on the tiny UNet equals
    the payload of a real exact kohya export of a full-spectrum adapter."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export_size import exact_pairs, kohya_bytes

    _, adapted = _adapted()
    unet = adapted.unet
    st.export_lora(unet, tmp_path / "k.safetensors", key_format="kohya")
    payload = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "k.safetensors")).values())
    assert payload == kohya_bytes(exact_pairs(tiny_pipeline("sd15").unet, "unet"), padded=False)
