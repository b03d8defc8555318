"""Trainable-parameter counts equal the closed forms."""

import pytest
import torch

import svdiff_tools as st
from svdiff_tools.methods.svft import banded_count


@pytest.fixture(scope="module")
def vit_b16():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig())  # ViT-B/16: 12 blocks, hidden 768, MLP 3072


def _block_linears(model):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer" in f".{n}"]
    return sorted({n.split(".")[-2] + "." + n.split(".")[-1] for n in names})


@pytest.mark.slow
def test_vit_b16_svft_plain_on_query_value(vit_b16):
    import copy

    model = copy.deepcopy(vit_b16)
    # transformers >= 5 names them q_proj/v_proj; 4.x used query/value
    targets = r".*\.(q_proj|v_proj|query|value)"
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="plain", target_modules=targets))
    assert st.count_parameters(model)[0] == 18_432 == 12 * 2 * 768


@pytest.mark.slow
def test_vit_b16_svft_banded_d2_on_six_linears(vit_b16):
    import copy

    model = copy.deepcopy(vit_b16)
    six = _block_linears(vit_b16)
    assert len(six) == 6, six
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", svft_offset=2,
                                                 target_modules=six))
    per_matrix = 768 * (2 * 2 + 1) - 2 * 3  # k(2d+1) - d(d+1) with k = min(out, in) = 768
    assert st.count_parameters(model)[0] == 276_048 == 12 * 6 * per_matrix


def test_banded_count_formula():
    for r in range(1, 12):
        for d in range(0, 5):
            dense = sum(1 for i in range(r) for j in range(r) if abs(i - j) <= d)
            assert banded_count(r, d) == dense


def _tiny_unet():
    from conftest import MODEL_CASES

    return next(c for c in MODEL_CASES if c.name == "unet").build(0)


def _unet_matrices(unet, preset):
    from svdiff_tools.targets import resolve_targets

    out = []
    for name, module in resolve_targets(unet, preset):
        w = module.weight
        out.append((w.shape[0], w.reshape(w.shape[0], -1).shape[1], module.bias is not None))
    return out


@pytest.mark.parametrize("kwargs,formula", [
    (dict(method="svdiff"), lambda mats: sum(min(o, i) for o, i, _ in mats)),
    (dict(method="svfit", rank=2), lambda mats: sum(min(2, o, i) for o, i, _ in mats)),
    (dict(method="svft", svft_pattern="banded", svft_offset=1),
     lambda mats: sum(banded_count(min(o, i), 1) for o, i, _ in mats)),
    (dict(method="vectorfit"), lambda mats: sum(min(o, i) + o for o, i, _ in mats)),
])
def test_tiny_unet_counts_match_closed_forms(kwargs, formula):
    unet = _tiny_unet()
    mats = _unet_matrices(unet, "unet")
    st.inject_adapter(unet, st.SVDAdapterConfig(target_modules="unet", **kwargs))
    assert st.count_parameters(unet)[0] == formula(mats)
