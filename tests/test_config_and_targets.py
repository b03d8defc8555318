"""Bad configs and targets raise one clear error; presets and PEFT matching semantics."""

import pytest
import torch
from torch import nn

import svdiff_tools as st
from svdiff_tools.targets import resolve_targets

from conftest import MODEL_CASES


def _unet():
    return next(c for c in MODEL_CASES if c.name == "unet").build(0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="lora"), "method='lora' is not supported; choose one of svdiff, svfit, svft, vectorfit"),
    (dict(method="svfit", rank=0), "rank=0 must be at least 1"),
    (dict(method="svfit", rank=1.5), "energy fraction"),
    (dict(method="svfit", rank="8"), "must be None, a positive int"),
    (dict(method="svdiff", rank=4), "svdiff trains every singular value"),
    (dict(method="svft", svft_pattern="diagonal"), "svft_pattern='diagonal' is not supported"),
    (dict(method="svft", svft_offset=-1), "svft_offset=-1 must be a non-negative int"),
    (dict(method="svdiff", avf_k=2), "avf_k .* belongs to method='vectorfit'"),
    (dict(method="vectorfit", avf_interval=0), "avf_interval=0 must be a positive int"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(st.SVDConfigError, match=match):
        st.SVDAdapterConfig(**kwargs)


def test_rank_larger_than_matrix_names_the_module():
    model = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(st.SVDTargetError, match=r"rank 8 exceeds min\(out, in\) = 4 of module 0"):
        st.inject_adapter(model, st.SVDAdapterConfig(method="svfit", rank=8))
    assert isinstance(model[0], nn.Linear)


def test_targets_that_match_nothing_list_the_nearest_names():
    unet = _unet()
    with pytest.raises(st.SVDTargetError, match=r"matched no .*nearest names: .*to_q"):
        st.inject_adapter(unet, st.SVDAdapterConfig(target_modules=["to_qq", "to_kk"]))
    with pytest.raises(st.SVDTargetError, match=r"nearest names: .*proj_in"):
        st.inject_adapter(unet, st.SVDAdapterConfig(target_modules=r".*\.projin"))
    assert not any(isinstance(m, st.SVDLayer) for m in unet.modules())


def test_peft_list_semantics_and_regex():
    unet = _unet()
    names = [n for n, _ in resolve_targets(unet, ["to_out.0"])]
    assert names and all(n.endswith(".to_out.0") for n in names)
    names = [n for n, _ in resolve_targets(unet, ["attn1.to_q"])]
    assert names and all(n.endswith("attn1.to_q") for n in names)
    # a list entry must match whole name components
    assert not [n for n, _ in resolve_targets(unet, ["to_q", "o_q"]) if n.endswith("o_q") and not n.endswith("to_q")]
    regex = [n for n, _ in resolve_targets(unet, r"down_blocks\.0\..*\.to_[qkv]")]
    assert regex and all(n.startswith("down_blocks.0.") for n in regex)


def test_presets():
    unet = _unet()
    attn = {n for n, _ in resolve_targets(unet, "unet-attention")}
    full = {n for n, _ in resolve_targets(unet, "unet")}
    assert attn < full
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in attn)
    assert any(n.endswith("resnets.0.conv1") for n in full) and any(n.endswith("proj_in") for n in full)
    everything = {n for n, _ in resolve_targets(unet, "all")}
    assert full <= everything and "conv_in" in everything


def test_all_linear_skips_the_output_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16))
    names = [n for n, _ in resolve_targets(gpt2, "all-linear")]
    assert "lm_head" not in names
    assert any(n.endswith("attn.c_attn") for n in names)  # transformers' Conv1D counts as linear


def test_exclude_modules_and_duplicate_adapter_names():
    unet = _unet()
    st.inject_adapter(unet, st.SVDAdapterConfig(target_modules="unet-attention", exclude_modules=["to_k"]))
    assert not any(n.endswith("to_k") for n, m in unet.named_modules() if isinstance(m, st.SVDLayer))
    with pytest.raises(st.SVDTargetError, match="already has an adapter named .default."):
        st.inject_adapter(unet, st.SVDAdapterConfig(target_modules="unet-attention"))
    with pytest.raises(st.SVDTargetError, match="without dots"):
        st.inject_adapter(unet, st.SVDAdapterConfig(target_modules="unet-attention"), adapter_name="a.b")


def test_every_registered_method_runs_through_the_shared_suite():
    """The registry is the only list of methods: each has a case in the shared suite and states its defaults."""
    from conftest import METHOD_CASES
    from svdiff_tools.methods import REGISTRY

    covered = {case["method"] for case in METHOD_CASES.values()}
    assert covered == set(REGISTRY) == set(st.METHODS)
    for name, cls in REGISTRY.items():
        assert cls.lr_source and cls.default_lr > 0, name
        st.SVDAdapterConfig(method=name)  # the defaults are valid
