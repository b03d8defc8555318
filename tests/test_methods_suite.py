"""The shared suite: every method configuration on every model family goes through the same checks.

identity at init · float64 reference formula · merge == unmerged forward · unmerge/remove restore ·
save/load round trip · bad files refused with the model untouched · exact and truncated LoRA export
(read back by real PEFT).
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import svdiff_tools as st
from svdiff_tools.forward_paths import Recomposed
from svdiff_tools.layer import AdapterLayerMixin, NormDeltaLayer, SVDLayer
from svdiff_tools.model import adapter_layers

from conftest import fresh_copy
from reference import delta64, randomize_adapter, reference_model, rel_err, to_double, weight_matrix


def _adapt(case, kwargs, seed=0, trained=True):
    base = case.build(seed)
    model = fresh_copy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(target_modules=case.targets, **kwargs))
    if trained:
        randomize_adapter(model, seed=11)
    return base, model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before_state, before_types):
    assert not any(isinstance(m, AdapterLayerMixin) for m in model.modules())
    assert [type(m) for m in model.modules()] == before_types
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    for k in before_state:
        assert torch.equal(after[k], before_state[k]), k


def test_identity_at_init(model_case, method_kwargs):
    base, model = _adapt(model_case, method_kwargs, trained=False)
    assert torch.equal(model_case.run(model), model_case.run(base))
    trainable, _ = st.count_parameters(model)
    assert trainable > 0


def test_matches_float64_reference(model_case, method_kwargs):
    """End to end with float64 decompositions: only the float32 forward's rounding remains."""
    base, model = _adapt(model_case, dict(method_kwargs, svd_dtype="float64"))
    out = model_case.run(model)
    ref = reference_model(base, model)
    with torch.no_grad():
        expected = model_case.forward(ref, to_double(model_case.inputs()))
    base_out = model_case.run(base)
    assert rel_err(out, base_out) > 1e-3  # the adapter really changes the output
    assert rel_err(out, expected) < 5e-6


def test_float32_decomposition_within_perturbation_bound(model_case, method_kwargs):
    """With float32 SVDs each layer's delta matches the float64 formula up to the Davis-Kahan bound:
    singular vectors rotate by ~ eps32 * sigma_1 / (smallest gap between singular values)."""
    _, model = _adapt(model_case, method_kwargs)
    eps = torch.finfo(torch.float32).eps
    for name, layer in adapter_layers(model):
        if not isinstance(layer, SVDLayer):
            continue
        S = torch.linalg.svdvals(weight_matrix(layer.base_module))
        gap = float((S[:-1] - S[1:]).min()) if S.numel() > 1 else float(S[0])
        bound = 10 * eps * float(S[0]) / max(gap, 1e-30) + 1e-5
        err = rel_err(layer.delta_matrix(["default"]).detach(), delta64(layer, "default"))
        assert err < bound, (name, err, bound)


@pytest.mark.parametrize("mode", ["recompose", "factored"])
def test_forward_paths_agree(model_case, method_kwargs, mode):
    _, auto = _adapt(model_case, method_kwargs)
    _, forced = _adapt(model_case, dict(method_kwargs, forward_mode=mode))
    assert rel_err(model_case.run(forced), model_case.run(auto)) < 1e-5


def test_merge_unmerge_remove(model_case, method_kwargs):
    base, model = _adapt(model_case, method_kwargs)
    unmerged = model_case.run(model)
    st.merge_adapter(model)
    assert rel_err(model_case.run(model), unmerged) < 1e-5
    st.unmerge_adapter(model)
    for name, layer in adapter_layers(model):
        orig = base.get_submodule(name)
        torch.testing.assert_close(layer.base_module.weight, orig.weight, rtol=0, atol=1e-6)
        if getattr(orig, "bias", None) is None:
            assert getattr(layer.base_module, "bias", None) is None
        else:
            torch.testing.assert_close(layer.base_module.bias, orig.bias, rtol=0, atol=1e-6)
    assert rel_err(model_case.run(model), unmerged) < 1e-6
    st.remove_adapter(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    torch.testing.assert_close(model_case.run(model), model_case.run(base), rtol=0, atol=1e-5)


def test_remove_without_merge_is_exact(model_case, method_kwargs):
    base, model = _adapt(model_case, method_kwargs)
    st.remove_adapter(model)
    assert torch.equal(model_case.run(model), model_case.run(base))
    assert model.state_dict().keys() == base.state_dict().keys()


def test_save_load_roundtrip(model_case, method_kwargs, tmp_path):
    base, model = _adapt(model_case, method_kwargs)
    path = st.save_adapter(model, tmp_path / "adapter.safetensors")
    saved = load_file(str(path))
    assert set(saved) == set(st.model.adapter_parameters(model, "default")) | {
        k for k in saved if k.endswith((".rows", ".cols"))}
    fresh = fresh_copy(base)
    name = st.load_adapter(fresh, path)
    assert name == "default"
    torch.testing.assert_close(model_case.run(fresh), model_case.run(model), rtol=1e-5, atol=1e-6)
    # loading leaves adapter tensors frozen unless asked otherwise
    assert not any(p.requires_grad for p in st.model.adapter_parameters(fresh, "default").values())


def test_bad_files_leave_model_untouched(model_case, method_kwargs, tmp_path):
    _, model = _adapt(model_case, method_kwargs)
    path = st.save_adapter(model, tmp_path / "adapter.safetensors")
    target = model_case.build(0)
    before, types = _state(target), [type(m) for m in target.modules()]

    foreign = model_case.build(1)  # same architecture, other weights
    _, other = _adapt(model_case, method_kwargs, seed=1)
    foreign_path = st.save_adapter(other, tmp_path / "foreign.safetensors")
    with pytest.raises(st.SVDAdapterFileError, match="another base model"):
        st.load_adapter(target, foreign_path)
    _assert_untouched(target, before, types)
    assert foreign is not None

    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(st.SVDAdapterFileError, match="not a readable safetensors file"):
        st.load_adapter(target, truncated)
    _assert_untouched(target, before, types)

    pickle_file = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(2)}, pickle_file)
    with pytest.raises(st.SVDAdapterFileError, match="not a readable safetensors file"):
        st.load_adapter(target, pickle_file)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(st.SVDAdapterFileError, match="not an svdiff-tools adapter"):
        st.load_adapter(target, plain)
    _assert_untouched(target, before, types)


def _peft_reference(case, base, model, tmp_path, rank=None):
    out_dir = tmp_path / "peft_lora"
    report = st.export_lora(model, out_dir, rank=rank, key_format="peft")
    peft_model = PeftModel.from_pretrained(fresh_copy(base), str(out_dir))
    return report, case.run(peft_model)


def test_export_lora_exact_via_peft(model_case, method_kwargs, tmp_path):
    base, model = _adapt(model_case, method_kwargs)
    report, peft_out = _peft_reference(model_case, base, model, tmp_path)
    assert report.overall_error < 1e-5  # components below float32 noise are not exported
    has_norms = any(isinstance(m, NormDeltaLayer) for m in model.modules())
    assert any("norm weight delta" in d for d in report.dropped) == has_norms
    for lname, layer in adapter_layers(model):  # compare against what the LoRA format can carry
        if isinstance(layer, NormDeltaLayer):
            layer.set_active([])
        elif any(d.startswith(f"{lname}: bias delta") for d in report.dropped):
            layer.svd_adapters["default"].bias_delta.data.zero_()
    dropped_other = [d for d in report.dropped if "norm weight delta" not in d and "bias delta" not in d]
    assert dropped_other == []
    assert rel_err(peft_out, model_case.run(model)) < 2e-5


def test_truncated_export_error_matches_dropped_singular_values(model_case, method_kwargs, tmp_path):
    base, model = _adapt(model_case, method_kwargs)
    path = tmp_path / "lora.safetensors"
    report = st.export_lora(model, path, rank=1)
    lora = load_file(str(path))
    prefix = {"unet": "unet.", "clip_text": "text_encoder."}.get(model_case.name, "")
    total = dropped = 0.0
    for name, layer in adapter_layers(model):
        if not isinstance(layer, SVDLayer):
            continue
        D = delta64(layer, "default")
        s = torch.linalg.svdvals(D)
        expect = float(s[1:].norm() / s.norm()) if s.norm() > 0 else 0.0
        assert report.errors[name] == pytest.approx(expect, rel=1e-6, abs=1e-9)
        total += float(s.pow(2).sum())
        dropped += float(s[1:].pow(2).sum())
        if f"{prefix}{name}.lora_A.weight" in lora:
            A = lora[f"{prefix}{name}.lora_A.weight"].double().reshape(1, -1)
            B = lora[f"{prefix}{name}.lora_B.weight"].double().reshape(-1, 1)
            actual = float((D - B @ A).norm() / D.norm())
            assert actual == pytest.approx(expect, rel=1e-4, abs=1e-6)
    assert report.overall_error == pytest.approx(math.sqrt(dropped / total), rel=1e-6)


def _loss_and_grads(case, model):
    model.zero_grad(set_to_none=True)
    out = case.forward(model, case.inputs())
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_weight_recipe_rebuilds_the_same_weight_in_backward(model_case, method_kwargs, monkeypatch):
    """Recomposed layers may store a recipe instead of W' for backward; the gradients must not change."""
    _, model = _adapt(model_case, dict(method_kwargs, forward_mode="recompose"))
    monkeypatch.setattr(Recomposed, "RECOMPUTE_MIN_NUMEL", 1 << 62)
    out_kept, grads_kept = _loss_and_grads(model_case, model)
    builds = []
    real = Recomposed.matrix
    monkeypatch.setattr(Recomposed, "matrix", lambda self, *a: builds.append(1) or real(self, *a))
    monkeypatch.setattr(Recomposed, "RECOMPUTE_MIN_NUMEL", 0)
    out_recipe, grads_recipe = _loss_and_grads(model_case, model)
    layers = [m for _, m in adapter_layers(model) if isinstance(m, SVDLayer)]
    rebuilt = len(builds) - len(layers)  # builds in backward (a layer whose input needs no gradient keeps no W')
    assert 0 < rebuilt <= sum(m.kind.name != "embedding" for m in layers)  # embedding backward needs no weight
    assert torch.equal(out_recipe, out_kept)
    assert all(torch.equal(a, b) for a, b in zip(grads_recipe, grads_kept))


@pytest.mark.parametrize("recipe", [False, True])
def test_weight_recipe_frees_the_recomposed_weight_until_backward(recipe, monkeypatch):
    """With the recipe, nothing keeps W' alive between forward and backward (that is its whole point)."""
    import weakref

    from torch import nn

    monkeypatch.setattr(Recomposed, "rebuild_in_backward", lambda self, layer, weight, live: recipe)
    model = nn.Sequential(nn.Linear(32, 32), nn.Conv1d(32, 16, 3))
    st.inject_adapter(model, st.SVDAdapterConfig(method="svfit", rank=4, target_modules=["0"],
                                                 forward_mode="recompose"))
    built = []
    real = Recomposed.matrix

    def spy(self, *args):
        matrix = real(self, *args)
        built.append(weakref.ref(matrix))
        return matrix

    monkeypatch.setattr(Recomposed, "matrix", spy)
    x = torch.randn(2, 32, 32, requires_grad=True)
    out = model[1](model[0](x).transpose(1, 2))
    assert built[0]() is None if recipe else built[0]() is not None
    out.square().sum().backward()
    assert len(built) == (2 if recipe else 1) and x.grad.abs().sum() > 0
