"""SVFT's two products X @ M (a dense r x r GEMM for small r, index_select/index_add above it) agree."""

import pytest
import torch

from svdiff_tools.methods.svft import SVFT

from conftest import MODEL_CASES
from reference import rel_err
from test_methods_suite import _adapt

UNET = next(c for c in MODEL_CASES if c.name == "unet")


@pytest.mark.parametrize("kwargs", [dict(svft_pattern="banded", svft_offset=2),
                                    dict(svft_pattern="random", svft_offset=1, svft_seed=3),
                                    dict(svft_pattern="top_k", svft_offset=1)])
def test_sparse_and_dense_products_agree(kwargs, monkeypatch):
    results = []
    for dense_rank in (SVFT.DENSE_RANK, 0):
        monkeypatch.setattr(SVFT, "DENSE_RANK", dense_rank)
        _, model = _adapt(UNET, dict(method="svft", **kwargs))
        out = UNET.forward(model, UNET.inputs())
        out.square().mean().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        results.append((out.detach(), grads))
    (out_dense, g_dense), (out_sparse, g_sparse) = results
    assert rel_err(out_sparse, out_dense) < 1e-6
    assert rel_err(g_sparse, g_dense) < 1e-5 and g_dense.abs().max() > 0
