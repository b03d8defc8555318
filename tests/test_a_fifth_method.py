"""A new method is one file: a method defined here, with an option of its own, gets the config field, the trainer's
flag and default learning rate, the PEFT config, save/load and the LoRA export without any other file changed.

``svscale``: the top-r singular values, each delta scaled by an option, ``M = diag(svscale_gain * delta)``.
"""

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

import svdiff_tools as st
from svdiff_tools.methods import DiagonalDeltaMethod, Option, register, unregister

from reference import canonical_svd64, rel_err


class SVScale(DiagonalDeltaMethod):
    """SVScale: the top-r singular values with a gain on their deltas (a test method)."""

    name = "svscale"
    rank_forms = ("top_r",)
    default_rank = 4
    default_lr = 2e-3
    lr_source = "tests/test_a_fifth_method.py"
    options = (Option("svscale_gain", float, 2.0, "svscale: the gain on every singular-value delta", minimum=0.0),)

    def __init__(self, sigma, config, out_features, U=None, V=None):
        super().__init__(sigma, config, out_features)
        self.gain = float(config.svscale_gain)

    def diag_values(self):
        return self.gain * self.delta


@pytest.fixture
def svscale():
    """Registered for one test, then taken out again (the registry, PEFT's tables, the trainer's choices)."""
    import svdiff_tools.peft  # noqa: F401  (follows registrations from here on)

    register(SVScale)
    yield SVScale
    unregister(SVScale.name)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6)).eval()


def _randomize(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))


def test_its_option_is_a_config_field_with_its_default_and_its_checks(svscale):
    config = st.SVDAdapterConfig(method="svscale")
    assert config.svscale_gain == 2.0 and config.rank is None
    assert st.SVDAdapterConfig(method="svscale", svscale_gain=0.5).to_dict()["svscale_gain"] == 0.5
    with pytest.raises(st.SVDConfigError, match="svscale_gain=-1.0 must be a finite number >= 0"):
        st.SVDAdapterConfig(method="svscale", svscale_gain=-1.0)
    with pytest.raises(st.SVDConfigError, match="energy fractions"):
        st.SVDAdapterConfig(method="svscale", rank=0.5)


def test_it_starts_as_the_base_and_matches_a_float64_formula(svscale):
    base, model = _model(), _model()
    st.inject_adapter(model, st.SVDAdapterConfig(method="svscale", svscale_gain=3.0, target_modules=["0", "2"]))
    assert torch.equal(model(X), base(X))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.numel() for p in trainable] == [4, 4]  # the top 4 singular values of each layer (default_rank)
    _randomize(model)
    reference = _model().double()
    for index in ("0", "2"):
        layer, target = model.get_submodule(index), reference.get_submodule(index)
        W = target.weight.detach()
        U, S, V = canonical_svd64(W)
        delta = layer.svd_adapters["default"].delta.detach().double()
        with torch.no_grad():
            target.weight += U[:, :4] @ torch.diag(3.0 * delta) @ V[:, :4].T
    assert rel_err(model(X).double(), reference(X.double())) < 1e-5


def test_save_load_and_the_lora_export_carry_it(svscale, tmp_path):
    model = _model()
    st.inject_adapter(model, st.SVDAdapterConfig(method="svscale", svscale_gain=3.0, target_modules=["0", "2"]))
    _randomize(model)
    path = st.save_adapter(model, tmp_path / "svd_adapter.safetensors")
    with safe_open(str(path), "pt") as f:
        components = json.loads(f.metadata()["components"])
    assert components[""]["config"]["svscale_gain"] == 3.0
    fresh = _model()
    st.load_adapter(fresh, path)
    assert torch.equal(fresh(X), model(X))
    report = st.export_lora(model, tmp_path / "lora", key_format="peft")
    assert report.overall_error < 1e-5
    lora = PeftModel.from_pretrained(_model(), str(tmp_path / "lora"))
    assert rel_err(lora(X), model(X)) < 2e-5


def test_peft_gets_its_config_class_and_seals_its_option(svscale, tmp_path):
    import svdiff_tools.peft as sp

    config_cls = sp.CONFIGS["svscale"]
    assert config_cls.__name__ == "SVScaleConfig" and config_cls().svscale_gain == 2.0
    model = get_peft_model(_model(), config_cls(target_modules=["0", "2"], svscale_gain=3.0))
    assert torch.equal(model(X), _model()(X))
    _randomize(model)
    model.save_pretrained(str(tmp_path / "peft"))
    again = PeftModel.from_pretrained(_model(), str(tmp_path / "peft"))
    assert torch.equal(again(X), model(X))
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["svscale_gain"] == 3.0
    saved["svscale_gain"] = 9.0
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(st.SVDAdapterFileError, match="fails its checksum"):
        PeftModel.from_pretrained(_model(), str(tmp_path / "peft"))


def test_the_trainer_gets_its_flag_default_learning_rate_and_trains_it(svscale, tmp_path, monkeypatch):
    from svdiff_trainer.args import build_parser, parse_args, spectral_config

    monkeypatch.setenv("SVDIFF_TOOLS_EMBEDDED", "tiny")
    monkeypatch.chdir(tmp_path)
    assert "--svscale_gain" in build_parser().format_help()
    cfg = parse_args(["--method", "svscale", "--svscale_gain", "1.5", "--output_dir", "out"])
    assert cfg.optim.learning_rate == 2e-3 and spectral_config(cfg.method).svscale_gain == 1.5
    from svdiff_trainer.dreambooth import main

    assert main(["--method", "svscale", "--svscale_gain", "1.5", "--max_train_steps", "2",
                 "--num_validation_images", "1", "--output_dir", "out"]) == 0
    with safe_open(str(tmp_path / "out" / "svd_adapter.safetensors"), "pt") as f:
        components = json.loads(f.metadata()["components"])
    assert {c["config"]["method"] for c in components.values()} == {"svscale"}
    assert {c["config"]["svscale_gain"] for c in components.values()} == {1.5}
    assert os.path.isfile(tmp_path / "out" / "README.md")


def test_taken_out_again_it_is_nowhere(svscale):
    import svdiff_tools.peft as sp
    from svdiff_trainer.args import all_methods

    unregister("svscale")
    assert "svscale" not in all_methods() and "svscale" not in sp.CONFIGS
    assert "svscale_gain" not in st.SVDAdapterConfig().to_dict()
    register(SVScale)  # the fixture's teardown takes it out again
