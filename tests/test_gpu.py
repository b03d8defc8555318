"""CUDA checks (marked ``gpu``; skipped where no CUDA device exists, e.g. in CI): the decomposition routes
agree across devices, and a bf16 training step keeps identity at init and the recipe's exact gradients."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svdiff_tools as st
from svdiff_tools import decomposition as dec
from svdiff_tools.forward_paths import Recomposed
from svdiff_tools.layer import SVDLayer

from conftest import MODEL_CASES
from reference import randomize_adapter, rel_err

UNET = next(c for c in MODEL_CASES if c.name == "unet")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(320, 320), (320, 2880), (1280, 640)])
def test_gram_route_on_cuda_gives_the_cpu_basis(shape):
    g = torch.Generator().manual_seed(0)
    W = (torch.rand(shape, generator=g) * 2 - 1) / shape[1] ** 0.5
    cpu, gpu = dec.gram_svd(W), dec.gram_svd(W.cuda())
    n = dec.numerical_rank(cpu.S, shape)
    top = min(n, 64)  # well-separated leading components: same vectors, same signs
    assert (gpu.U[:, :top].cpu() - cpu.U[:, :top]).abs().max() < 1e-4
    assert (gpu.V[:, :top].cpu() - cpu.V[:, :top]).abs().max() < 1e-4
    torch.testing.assert_close(gpu.S.cpu(), cpu.S, rtol=1e-5, atol=1e-6)


def _cuda_unet(method_kwargs):
    base = UNET.build(0).cuda().to(torch.bfloat16)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(target_modules="unet", forward_mode="recompose", **method_kwargs))
    return base, model


def _inputs():
    return tuple(x.cuda().to(torch.bfloat16) if x.is_floating_point() else x.cuda() for x in UNET.inputs())


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [dict(method="svdiff"), dict(method="svfit", rank=4)])
def test_bf16_step_identity_and_recipe_gradients(kwargs, monkeypatch):
    base, model = _cuda_unet(kwargs)
    with torch.no_grad():
        assert torch.equal(UNET.forward(model, _inputs()), UNET.forward(base, _inputs()))
    randomize_adapter(model, seed=3, magnitude=0.05)
    grads = []
    for recipe in (False, True):
        monkeypatch.setattr(Recomposed, "rebuild_in_backward", lambda self, layer, w, live, on=recipe: on)
        model.zero_grad(set_to_none=True)
        UNET.forward(model, _inputs()).float().square().mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert rel_err(grads[1], grads[0]) < 1e-6


@pytest.mark.gpu
def test_train_step_benchmark_runs_on_cuda():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--config", "tiny",
                             "--device", "cuda", "--warmup", "1", "--repeats", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("worst adapter ratio to floor:")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["recompose", "factored"])
def test_one_sided_bf16_on_cuda_matches_two_sided(mode):
    """One-sided bases on CUDA in bf16 (both forward paths) stay within 2x the two-sided delta's error."""
    from test_one_sided import graded_module, METHODS
    from reference import delta64

    errors = {}
    for storage in ("one_sided", "both"):
        model, x = graded_module("conv_left")
        model = model.to("cuda", torch.bfloat16)
        st.inject_adapter(model, st.SVDAdapterConfig(target_modules=["0"], basis_storage=storage,
                                                     forward_mode=mode, **METHODS["svdiff"]))
        randomize_adapter(model, seed=0, magnitude=0.05)
        layer = model[0]
        assert (next(iter(layer.bases.values())).head > 0) == (storage == "one_sided")
        x = x.to("cuda", torch.bfloat16)
        with torch.no_grad():
            adapted = model(x).double()
            base = layer.kind.forward(x, layer.base_module.weight, layer.base_module.bias).double()
            expected = torch.nn.functional.conv2d(x.double(), layer.kind.weight_from_matrix(
                delta64(layer, "default").to("cuda")), padding=1)
        errors[storage] = rel_err(adapted - base, expected)
    assert errors["one_sided"] < 2 * errors["both"] + 1e-3
