"""Adapters through the runtime switches users flip: CPU offload, torch.compile, xformers."""

import copy
import importlib.util

import numpy as np
import pytest
import torch

import svdiff_tools.diffusers  # noqa: F401  (the pipeline verbs)
from svdiff_trainer.tiny import tiny_pipeline

from test_pipelines import adapt, run


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    base = tiny_pipeline("sd15")
    base.set_progress_bar_config(disable=True)
    source = adapt(copy.deepcopy(base))
    return base, run(source), source.save_svd_adapter(tmp_path_factory.mktemp("rt"))


def _loaded(sd15):
    base, expected, path = sd15
    pipe = copy.deepcopy(base)
    pipe.load_svd_adapter(path)
    return pipe, expected


def test_model_cpu_offload(sd15):
    pipe, expected = _loaded(sd15)
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(run(pipe), expected, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_of_fused_denoiser(sd15):
    pipe, expected = _loaded(sd15)
    pipe.fuse_svd_adapter()
    pipe.unet = torch.compile(pipe.unet)
    np.testing.assert_allclose(run(pipe), expected, atol=2e-5)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_attention(sd15):
    pipe, expected = _loaded(sd15)
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # xformers present but unusable on this device/torch
        pytest.skip(f"xformers does not run here: {exc}")
    np.testing.assert_allclose(run(pipe), expected, atol=1e-4)


@pytest.mark.gpu
def test_gpu_offload_and_fp16(sd15):
    base, _, path = sd15
    pipe = copy.deepcopy(base).to(torch.float16)
    pipe.load_svd_adapter(path)
    pipe.enable_model_cpu_offload()
    on_gpu = run(pipe)
    ref = copy.deepcopy(base)
    ref.load_svd_adapter(path)
    np.testing.assert_allclose(on_gpu, run(ref), atol=5e-2)
