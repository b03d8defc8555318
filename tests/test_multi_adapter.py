"""Several named adapters per layer, scales, activation, enable/disable, and training behaviour."""

import copy

import pytest
import torch

import svdiff_tools as st
from svdiff_tools.model import adapter_layers

from conftest import MODEL_CASES
from reference import randomize_adapter, reference_model, rel_err, to_double

UNET = next(c for c in MODEL_CASES if c.name == "unet")


def _two_adapters():
    base = UNET.build(0)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules="unet-attention"), "a")
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", target_modules="unet",
                                                 svd_dtype="float64"), "b")
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    return base, model


def test_two_adapters_with_weights_match_reference():
    base, model = _two_adapters()
    st.set_active_adapters(model, ["a", "b"], weights=[0.5, -1.5])
    ref = reference_model(base, model, adapter_names=("a", "b"))
    with torch.no_grad():
        expected = UNET.forward(ref, to_double(UNET.inputs()))
    assert rel_err(UNET.run(model), expected) < 3e-4
    # only "b", at its own scale
    st.set_active_adapters(model, ["b"])
    ref_b = reference_model(base, model, adapter_names=("b",))
    with torch.no_grad():
        expected_b = UNET.forward(ref_b, to_double(UNET.inputs()))
    assert rel_err(UNET.run(model), expected_b) < 5e-6


def test_scale_zero_disable_and_context_manager_give_the_base():
    base, model = _two_adapters()
    out_base = UNET.run(base)
    with st.adapters_disabled(model):
        assert torch.equal(UNET.run(model), out_base)
    assert not torch.equal(UNET.run(model), out_base)
    st.set_adapter_scale(model, "a", 0.0)
    st.set_adapter_scale(model, "b", 0.0)
    assert torch.equal(UNET.run(model), out_base)


def test_merge_one_adapter_keeps_the_other_live_and_remove_one():
    base, model = _two_adapters()
    out = UNET.run(model)
    st.merge_adapter(model, ["a"])
    assert rel_err(UNET.run(model), out) < 1e-5
    st.unmerge_adapter(model)
    st.remove_adapter(model, "a")
    assert st.get_adapter_names(model) == ["b"]
    assert all("a" not in getattr(layer, "scales", {}) for _, layer in adapter_layers(model))
    st.set_active_adapters(model, ["b"])
    ref_b = reference_model(base, model, adapter_names=("b",))
    with torch.no_grad():
        expected_b = UNET.forward(ref_b, to_double(UNET.inputs()))
    assert rel_err(UNET.run(model), expected_b) < 5e-6
    st.remove_adapter(model)  # "a" went through merge/unmerge: equal up to float rounding
    torch.testing.assert_close(UNET.run(model), UNET.run(base), rtol=0, atol=1e-6)


def test_shared_basis_between_adapters_of_one_layer():
    _, model = _two_adapters()
    layer = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert set(layer.svd_adapters) == {"a", "b"}
    assert len(layer.bases) == 2  # "b" asked for float64 decompositions, "a" for float32
    st.inject_adapter(model, st.SVDAdapterConfig(method="vectorfit", target_modules="unet-attention"), "c")
    assert len(layer.bases) == 2  # "c" reuses "a"'s float32 basis


def test_wrapped_layers_keep_their_attributes():
    _, model = _two_adapters()
    layer = model.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.in_features == 16 and layer.weight is layer.base_module.weight
    conv = model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert conv.kernel_size == (3, 3)


@pytest.mark.parametrize("method", ["svdiff", "svfit", "svft", "vectorfit"])
def test_training_step_updates_only_the_adapter(method):
    base = UNET.build(0)
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method=method, target_modules="unet", train_norms=method == "svdiff"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".svd_adapters.default." in n or ".weight_deltas.default" in n for n in trainable)
    groups = st.get_parameter_groups(model, lr=1e-3, lr_1d=1e-6)
    assert [g["lr"] for g in groups] == ([1e-3, 1e-6] if method == "svdiff" else [1e-3])
    opt = torch.optim.Adam(groups)
    sample, t, ehs = UNET.inputs()
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    losses = []
    for _ in range(5):
        loss = model(sample, t, encoder_hidden_states=ehs).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_cached_live_state_follows_every_change():
    """Layers cache their live adapters and factor views; each mutation (and a dtype move, a deepcopy, a
    pickle round trip) must drop that cache, so every run below is checked against a fresh reference."""
    import pickle

    base, model = _two_adapters()
    x64 = to_double(UNET.inputs())

    def check(adapted, names, tol):
        ref = reference_model(base, adapted, adapter_names=names)
        with torch.no_grad():
            expected = UNET.forward(ref, x64)
        assert rel_err(UNET.run(adapted), expected) < tol

    UNET.run(model)  # fills every cache
    st.set_adapter_scale(model, "b", -0.7)
    check(model, ("a", "b"), 3e-4)
    st.set_active_adapters(model, ["a"])
    check(model, ("a",), 3e-4)
    st.merge_adapter(model, ["a"])
    st.set_active_adapters(model, ["b"])
    st.unmerge_adapter(model, ["a"])
    check(model, ("b",), 3e-4)
    copied = copy.deepcopy(model)
    st.set_adapter_scale(copied, "b", 0.3)  # the copy's change must not leak into the original
    check(model, ("b",), 3e-4)
    check(copied, ("b",), 3e-4)
    restored = pickle.loads(pickle.dumps(model))
    check(restored, ("b",), 3e-4)
    model.double()  # the cached factor views would still be float32
    ref = reference_model(base, model, adapter_names=("b",))
    with torch.no_grad():
        assert rel_err(UNET.forward(model, x64), UNET.forward(ref, x64)) < 1e-6
    for _, layer in adapter_layers(model):  # and the cached factors are views of the moved buffers
        if hasattr(layer, "bases"):
            entry = layer.live()[0]
            basis = layer.bases[layer.basis_of["b"]]
            assert entry.parts.U.dtype == torch.float64 and entry.parts.U.untyped_storage().data_ptr() == \
                basis.U.untyped_storage().data_ptr()


@pytest.mark.parametrize("recipe", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(recipe, monkeypatch):
    """diffusers' gradient checkpointing (non-reentrant) reruns adapter layers in backward, with and without
    the rebuilt-weight recipe: the gradients equal those of a plain backward."""
    from svdiff_tools.forward_paths import Recomposed

    monkeypatch.setattr(Recomposed, "RECOMPUTE_MIN_NUMEL", 0 if recipe else 1 << 62)
    grads = []
    for checkpointing in (False, True):
        model = UNET.build(0)
        st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules="unet", forward_mode="recompose"))
        randomize_adapter(model, seed=4)
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        UNET.forward(model, UNET.inputs()).square().mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode, config", [("auto", dict(method="svfit", rank=3)),
                                          ("factored", dict(method="svfit", rank=3)),
                                          ("factored", dict(method="svdiff", basis_storage="one_sided"))])
def test_training_step_compiles_without_graph_breaks(mode, config):
    """torch.compile(fullgraph=True) traces the adapter layers (cached live state, path choice, factored and
    recomposed paths; one-sided bases of both orientations) in training; its gradients equal eager ones."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.SiLU(),
                          nn.Conv2d(12, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 7 * 7, 10), nn.Linear(10, 30))
    st.inject_adapter(model, st.SVDAdapterConfig(target_modules="all", forward_mode=mode, **config))
    randomize_adapter(model, seed=2)
    if "basis_storage" in config:
        bases = [b for m in model.modules() if hasattr(m, "bases") for b in m.bases.values()]
        assert {b.right for b in bases if b.head} == {False, True}
    x = torch.randn(2, 6, 7, 7)

    def grads(m):
        model.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_layers_without_live_adapters_pass_straight_through():
    """Merged (or disabled) adapters: the wrapper hands the call to the base layer's own forward, still runs
    hooks registered on the base layer, and applies the adapter again as soon as it is unmerged."""
    base, model = _two_adapters()
    unmerged = UNET.run(model)
    st.merge_adapter(model)
    merged = UNET.run(model)
    assert rel_err(merged, unmerged) < 1e-5
    layers = [m for _, m in adapter_layers(model)]
    assert all("forward" in m.__dict__ for m in layers)  # the pass-through is installed
    calls = []
    handle = layers[0].base_module.register_forward_hook(lambda *a: calls.append(1))
    UNET.run(model)
    assert calls == [1]
    handle.remove()
    st.unmerge_adapter(model)
    assert all("forward" not in m.__dict__ for m in layers)
    again = UNET.run(model)  # unmerging rounds W back, so equal up to float32 rounding
    assert rel_err(again, unmerged) < 1e-5 and rel_err(again, UNET.run(base)) > 1e-3
    with st.adapters_disabled(model):
        assert rel_err(UNET.run(model), UNET.run(base)) < 1e-5
    assert torch.equal(UNET.run(model), again)
    copied = copy.deepcopy(model)  # no stale bound method travels with a copy
    assert torch.equal(UNET.run(copied), again)
