"""One-sided bases: full-spectrum adapters store the smaller singular factor and only the ill-conditioned tail
of the larger one; the rest is derived from W (``V_h = W^T U_h / S_h``). Checked against the float64
reference (`reference.delta64`) on weights whose spectra have both a head and a tail, in both orientations."""

import copy

import pytest
import torch
from torch import nn

import svdiff_tools as st
from svdiff_tools import forward_paths
from svdiff_tools.diffusers.call_scale import set_call_scale
from svdiff_tools.basis import SVDBasis

from reference import delta64, rel_err, set_weight_matrix, randomize_adapter, reference_model

# (module, input shape): left (out < in), right (out > in), square, conv left, conv right (1x1: the factored
# path takes an input correction), conv right with a 3x3 kernel (recomposed path only)
MODULES = {
    "linear_left": (lambda: nn.Linear(48, 24), (5, 48)),
    "linear_right": (lambda: nn.Linear(20, 40), (5, 20)),
    "linear_square": (lambda: nn.Linear(32, 32), (5, 32)),
    "conv_left": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv_right": (lambda: nn.Conv2d(8, 24, 1), (1, 8, 2, 2)),
    "conv_right_wide": (lambda: nn.Conv2d(2, 24, 3, padding=1), (2, 2, 5, 5)),
}
METHODS = {
    "svdiff": dict(method="svdiff"),
    "vectorfit": dict(method="vectorfit"),
    "svft_banded": dict(method="svft", svft_pattern="banded", svft_offset=2),
}


def graded_module(name: str, seed: int = 0) -> tuple:
    """The module with singular values spread from 1 down to 1e-3, so some lie below S_1 / HEAD_CONDITION."""
    make, shape = MODULES[name]
    torch.manual_seed(seed)
    module = make()
    W = module.weight.detach().reshape(module.weight.shape[0], -1).double()
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    S = torch.logspace(0, -3, U.shape[1], dtype=torch.float64)
    set_weight_matrix(module, ((U * S) @ Vh).float())
    return nn.Sequential(module), torch.randn(shape)


def adapted(name: str, method: str, storage: str = "one_sided", seed: int = 0):
    model, x = graded_module(name)
    st.inject_adapter(model, st.SVDAdapterConfig(target_modules=["0"], basis_storage=storage, **METHODS[method]))
    randomize_adapter(model, seed=seed, magnitude=0.05)
    return model, x


def assert_same_outputs_and_gradients(one: nn.Module, both: nn.Module, x: torch.Tensor) -> None:
    for p in list(one.parameters()) + list(both.parameters()):
        p.grad = None
    y1, y2 = one(x), both(x)
    assert rel_err(y1, y2) < 1e-5
    (y1 * y2.detach()).sum().backward()
    (y2 * y2.detach()).sum().backward()
    g1 = torch.cat([p.grad.reshape(-1) for p in one.parameters() if p.requires_grad])
    g2 = torch.cat([p.grad.reshape(-1) for p in both.parameters() if p.requires_grad])
    assert g2.abs().max() > 0 and rel_err(g1, g2) < 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODULES)
def test_one_sided_delta_output_and_gradients_match_float64_and_two_sided(name, method):
    one, x = adapted(name, method)
    both, _ = adapted(name, method, "both")
    layer, layer2 = one[0], both[0]
    basis = next(iter(layer.bases.values()))
    q = basis.S.shape[0]
    assert 0 < basis.head < q, "the graded spectrum has a head and a tail"
    assert basis.right == ("right" in name)
    assert next(iter(layer2.bases.values())).head == 0
    ref = delta64(layer, "default")
    assert rel_err(layer.delta_matrix(["default"]), ref) < 1e-5
    # the forward (recomposed through the one-sided product) and gradients, against the two-sided layer
    assert_same_outputs_and_gradients(one, both, x)
    # the factored path (left: x V_h read from the base output; right: the head's term added to the input) gives
    # the same outputs and gradients, with few tokens (z scaled) and with many (M folded into an operand)
    if layer.kind.supports_input_correction() or not basis.right:
        for m in (one, both):
            m[0].forward_modes["default"] = "factored"
            m[0].invalidate()
        assert forward_paths.choose(one[0], x, one[0].live()) is forward_paths.FACTORED and next(iter(layer.bases.values())).head > 0
        assert_same_outputs_and_gradients(one, both, x)
        many = x.repeat(8, *([1] * (x.dim() - 1))) if x.dim() > 2 else x.repeat(30, 1)
        assert layer.kind.tokens(many) > max(layer.kind.matrix_shape)
        assert_same_outputs_and_gradients(one, both, many)
        for m in (one, both):  # diffusers' per-call scale (cross_attention_kwargs={"scale": s})
            set_call_scale(m, 0.5)
        assert_same_outputs_and_gradients(one, both, x)
    # export needs both factors: the derived ones come out right
    U, V = layer.factors("default")
    U2, V2 = layer2.factors("default")
    assert rel_err(U, U2) < 1e-5 and rel_err(V, V2) < 1e-5


@pytest.mark.parametrize("name", MODULES)
def test_one_sided_basis_stores_less(name):
    one, _ = adapted(name, "svdiff")
    both, _ = adapted(name, "svdiff", "both")

    def stored(model):
        return sum(b.numel() for b in next(iter(model[0].bases.values())).buffers())

    W = one[0].base_module.weight
    out, inn = W.shape[0], W[0].numel()
    q = min(out, inn)
    basis = next(iter(one[0].bases.values()))
    assert stored(both) == (out + inn + 1) * q
    assert stored(one) == q * q + (max(out, inn)) * (q - basis.head) + q


def test_identity_at_init_is_exact():
    model, x = graded_module("linear_square")
    base = copy.deepcopy(model)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules=["0"], basis_storage="one_sided"))
    assert next(iter(model[0].bases.values())).head > 0
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("name", ["linear_left", "linear_right"])
def test_merge_stores_both_factors_first_and_unmerge_restores(name):
    model, x = adapted(name, "svft_banded")
    layer = model[0]
    basis = next(iter(layer.bases.values()))
    W, head, stored = layer.base_module.weight.detach().clone(), basis.head, (basis.U.clone(), basis.V.clone())
    expected = model(x).detach()
    st.merge_adapter(model)
    basis = next(iter(layer.bases.values()))  # the layer's basis, now stored whole
    assert basis.head == 0 and basis.U.shape[1] == basis.V.shape[1] == basis.S.shape[0]
    assert rel_err(model(x), expected) < 1e-5
    st.unmerge_adapter(model)  # one-sided again, with the same stored columns
    basis = next(iter(layer.bases.values()))
    assert basis.head == head and torch.equal(basis.U, stored[0]) and torch.equal(basis.V, stored[1])
    assert (layer.base_module.weight - W).abs().max() < 1e-6
    assert rel_err(model(x), expected) < 1e-5


def test_second_adapter_on_a_merged_layer_reads_the_unmerged_weight():
    model, x = adapted("linear_right", "svdiff")
    reference = copy.deepcopy(model)
    st.merge_adapter(model)
    config = st.SVDAdapterConfig(method="vectorfit", target_modules=["0"], basis_storage="one_sided")
    for m in (model, reference):
        st.inject_adapter(m, config, adapter_name="b")
        randomize_adapter(m, "b", seed=1, magnitude=0.05)
    assert rel_err(model(x), reference(x)) < 1e-5


@pytest.mark.parametrize("name, config", [("conv_right_wide", dict(forward_mode="factored")),
                                          ("conv_right_strided", dict(forward_mode="factored")),
                                          ("linear_left", dict(basis_storage="both")),
                                          ("linear_left", dict(rank=4, method="svft"))])
def test_two_sided_when_asked_factored_without_input_correction_or_low_rank(name, config):
    if name == "conv_right_strided":  # a strided 1x1 conv reads the input at every other position only
        model = nn.Sequential(nn.Conv2d(8, 24, 1, stride=2))
        assert not model[0].weight.shape[0] <= model[0].weight[0].numel()
    else:
        model, _ = graded_module(name)
    config = {"method": "svdiff", "target_modules": ["0"], "basis_storage": "one_sided", **config}
    st.inject_adapter(model, st.SVDAdapterConfig(**config))
    assert all(b.head == 0 for b in model[0].bases.values())


@pytest.mark.parametrize("name, one_sided", [("linear_left", True), ("linear_right", True),
                                             ("linear_square", True), ("conv_left", True), ("conv_right", True),
                                             ("conv_right_wide", False)])
def test_auto_storage_is_one_sided_where_the_factored_path_stays_open(name, one_sided, monkeypatch):
    model, _ = graded_module(name)
    small = copy.deepcopy(model)
    st.inject_adapter(small, st.SVDAdapterConfig(method="svdiff", target_modules=["0"]))
    assert next(iter(small[0].bases.values())).head == 0  # below AUTO_MIN_NUMEL: both factors
    monkeypatch.setattr(SVDBasis, "AUTO_MIN_NUMEL", 0)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff", target_modules=["0"]))
    assert (next(iter(model[0].bases.values())).head > 0) == one_sided


def test_one_sided_chooses_well_conditioned_components_only():
    U = torch.linalg.qr(torch.randn(6, 4)).Q
    V = torch.linalg.qr(torch.randn(9, 4)).Q
    S = torch.tensor([4.0, 1.0, 0.4, 0.1])
    basis = SVDBasis.one_sided(U, S, V, "gram")
    assert basis.head == 2 and not basis.right and basis.V.shape == (9, 2)
    assert torch.equal(basis.V, V[:, 2:])
    zero = SVDBasis.one_sided(U, torch.zeros(4), V, "gram")
    assert zero.head == 0 and zero.V.shape == (9, 4)


@pytest.mark.parametrize("method", ["svdiff", "svft_banded"])
@pytest.mark.parametrize("name", ["linear_left", "linear_right", "conv_left"])
def test_bfloat16_one_sided_error_stays_near_the_two_sided_one(name, method):
    """In bf16 the derived columns carry ~eps * S_1 / S_i error; with S_i >= S_1 / 8 the recomposed delta
    (W' - W, where W' is rounded to bf16 anyway) stays within 2x the two-sided error (measured: 1.2-1.5x)."""
    errors = {}
    for storage in ("one_sided", "both"):
        model, _ = graded_module(name)
        model = model.to(torch.bfloat16)
        st.inject_adapter(model, st.SVDAdapterConfig(target_modules=["0"], basis_storage=storage, **METHODS[method]))
        randomize_adapter(model, seed=0, magnitude=0.05)
        layer = model[0]
        W0 = layer.kind.matrix(layer.base_module.weight)
        recomposed = forward_paths.RECOMPOSED.matrix(layer, layer.live(), 1.0)
        errors[storage] = rel_err(recomposed.double() - W0.double(), delta64(layer, "default"))
    assert errors["one_sided"] < 2 * errors["both"] and errors["one_sided"] < 0.03


def test_storage_requests_outlive_or_follow_merges():
    """An adapter added to a merged layer leaves the shared basis to go back to one-sided storage at the unmerge;
    one that asks for both factors keeps them whole for good."""
    model, x = adapted("linear_left", "svdiff")
    layer = model[0]
    basis = next(iter(layer.bases.values()))
    head = basis.head
    st.merge_adapter(model)
    config = dict(method="vectorfit", target_modules=["0"], basis_storage="one_sided")
    st.inject_adapter(model, st.SVDAdapterConfig(**config), adapter_name="b")
    st.unmerge_adapter(model)
    assert next(iter(layer.bases.values())).head == head
    st.merge_adapter(model, ["default"])
    st.inject_adapter(model, st.SVDAdapterConfig(**{**config, "basis_storage": "both"}), adapter_name="c")
    st.unmerge_adapter(model)
    assert next(iter(layer.bases.values())).head == 0


@pytest.mark.parametrize("method", ["svdiff", "svft_banded"])
@pytest.mark.parametrize("name", ["linear_left", "linear_right", "conv_right"])
def test_bfloat16_factored_one_sided_error_stays_near_the_two_sided_one(name, method):
    """On the factored path in bf16 the right form rounds ``x + dx`` (the head's term enters the input) where the
    two-sided one rounds ``y + dy``; both errors are ~eps of the activation. Outputs against the float64 model,
    many tokens and few (z scaled); the adapter's own term is 5-30% of the output here."""
    errors = {}
    for storage in ("one_sided", "both"):
        base, x = graded_module(name)
        model = copy.deepcopy(base).to(torch.bfloat16)
        config = st.SVDAdapterConfig(target_modules=["0"], basis_storage=storage, forward_mode="factored",
                                     **METHODS[method])
        st.inject_adapter(model, config)
        randomize_adapter(model, seed=0, magnitude=0.2)
        assert (next(iter(model[0].bases.values())).head > 0) == (storage == "one_sided")
        ref = reference_model(base, model)
        for tokens, xs in (("few", x), ("many", x.repeat(30, *([1] * (x.dim() - 1))))):
            expected = ref(xs.double())
            with torch.no_grad():
                errors[storage, tokens] = rel_err(model(xs.bfloat16()).double(), expected)
            assert rel_err(base(xs).double(), expected) > 0.05  # the adapter's term is not lost in rounding
    for tokens in ("few", "many"):
        assert errors["one_sided", tokens] < 2 * errors["both", tokens] and errors["one_sided", tokens] < 0.02


@pytest.mark.parametrize("storage", ["one_sided", "both"])
@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: nn.Conv2d(4, 6, 3, stride=2),
                                  lambda: nn.Conv2d(8, 24, 1), lambda: nn.Conv2d(24, 8, 1)],
                         ids=["3x3", "3x3_strided", "1x1_right", "1x1_left"])
def test_factored_conv_on_one_image_matches_float64(make, storage):
    """One image: the conv projections run as one GEMM over channels (`ConvKind._channel_product`) instead of a
    conv with a copied kernel; outputs equal the float64 model's and gradients the batched (conv) path's."""
    torch.manual_seed(0)
    base = nn.Sequential(make())
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svft", svft_pattern="banded", svft_offset=2,
                                                 target_modules=["0"], basis_storage=storage,
                                                 forward_mode="factored"))
    randomize_adapter(model, seed=0, magnitude=0.2)
    layer = model[0]
    x = torch.randn(2, base[0].in_channels, 6, 6)
    assert forward_paths.choose(layer, x[:1], layer.live()) is forward_paths.FACTORED
    ref = reference_model(base, model)
    grads = []
    for xs in (x[:1], x):  # one image (GEMM), two images (conv)
        for p in model.parameters():
            p.grad = None
        y = model(xs)
        assert rel_err(y.double(), ref(xs.double())) < 1e-5
        y[:1].square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0 and rel_err(grads[0], grads[1]) < 1e-5
