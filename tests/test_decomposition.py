"""SVD machinery: sign rule, randomised top-r, numerical-rank masking, the on-disk cache."""

import copy

import pytest
import torch
from torch import nn

import svdiff_tools as st
from svdiff_tools import cache, decomposition as dec

from reference import randomize_adapter, rel_err


def _matrix(m, n, seed=0, decay=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    if decay is None:
        return A
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    S = torch.tensor([decay ** i for i in range(min(m, n))], dtype=torch.float64)
    return U @ torch.diag(S) @ Vh


def test_sign_rule_undoes_arbitrary_flips():
    A = _matrix(20, 12)
    d = dec.full_svd(A, torch.float64)
    flips = torch.tensor([(-1.0) ** i for i in range(12)], dtype=torch.float64)
    U2, V2 = dec.canonicalize_signs(d.U * flips, d.V * flips)
    assert torch.equal(U2, d.U) and torch.equal(V2, d.V)
    idx = d.U.abs().argmax(0)
    assert (d.U[idx, torch.arange(12)] > 0).all()
    torch.testing.assert_close(d.U @ torch.diag(d.S) @ d.V.T, A)


def test_float32_and_float64_bases_agree_after_sign_rule():
    A = _matrix(24, 16, seed=3)
    d32, d64 = dec.full_svd(A.float(), torch.float32), dec.full_svd(A, torch.float64)
    assert (d32.U.double() - d64.U).abs().max() < 1e-4
    assert (d32.V.double() - d64.V).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_gram_route_matches_float64_svd(shape):
    """The Gram eigendecomposition (the default full-spectrum route) against a float64 SVD of a float32
    matrix: same canonical basis and spectrum, orthonormal, exact reconstruction."""
    A = _matrix(*shape, seed=5, decay=0.9).float()
    exact = dec.full_svd(A.double(), torch.float64)
    g = dec.gram_svd(A, torch.float64)
    k = min(shape)
    assert g.driver == "gram" and g.U.shape == (shape[0], k) and g.V.shape == (shape[1], k)
    torch.testing.assert_close(g.S, exact.S, rtol=1e-9, atol=1e-12)
    assert (g.U - exact.U).abs().max() < 1e-8 and (g.V - exact.V).abs().max() < 1e-8
    eye = torch.eye(k, dtype=torch.float64)
    assert (g.U.T @ g.U - eye).abs().max() < 1e-9 and (g.V.T @ g.V - eye).abs().max() < 1e-9
    assert rel_err((g.U * g.S) @ g.V.T, A) < 1e-12


def test_gram_route_zeroes_components_under_the_numerical_rank():
    A = (_matrix(30, 4, seed=6) @ _matrix(4, 20, seed=7)).float()  # rank 4
    g = dec.gram_svd(A)
    assert dec.numerical_rank(g.S, A.shape) == 4 and torch.equal(g.S[4:], torch.zeros(16))
    assert torch.equal(g.U[:, 4:], torch.zeros(30, 16)) and torch.equal(g.V[:, 4:], torch.zeros(20, 16))
    assert torch.isfinite(g.U).all() and rel_err((g.U * g.S) @ g.V.T, A) < 1e-6


def test_randomized_svd_is_orthonormal_deterministic_and_accurate():
    A = _matrix(200, 120, decay=0.8)
    exact = dec.full_svd(A, torch.float64)
    r = 8
    a = dec.randomized_svd(A.float(), r)
    b = dec.randomized_svd(A.float(), r)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    eye = torch.eye(r)
    assert (a.U.T @ a.U - eye).abs().max() < 1e-5 and (a.V.T @ a.V - eye).abs().max() < 1e-5
    torch.testing.assert_close(a.S.double(), exact.S[:r], rtol=1e-5, atol=1e-6)
    assert (a.U.double() - exact.U[:, :r]).abs().max() < 1e-4  # same signs through the sign rule
    # it leaves the global RNG alone
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dec.randomized_svd(A.float(), r)
    assert torch.equal(torch.rand(3), expected)


def test_auto_driver_picks_randomized_for_small_top_r_and_records_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    st.inject_adapter(model, st.SVDAdapterConfig(method="svfit", rank=4))
    layer = model[0]
    assert layer.bases[layer.basis_of["default"]].driver == "randomized"
    randomize_adapter(model)
    path = st.save_adapter(model, tmp_path / "a.safetensors")
    fresh = nn.Sequential(copy.deepcopy(layer.base_module))
    st.load_adapter(fresh, path)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_rank_deficient_weights_are_masked():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    with torch.no_grad():  # rank 3
        lin.weight.copy_(torch.randn(12, 3) @ torch.randn(3, 16))
    zero = nn.Linear(12, 8)
    with torch.no_grad():
        zero.weight.zero_()
    model = nn.Sequential(lin, zero)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff"))
    assert model[0].svd_adapters["default"].rank == 3
    assert model[1].svd_adapters["default"].rank == 0
    randomize_adapter(model, magnitude=1.0)
    x = torch.randn(4, 16)
    out = model(x)
    assert torch.isfinite(out).all()
    # the update stays inside the weight's row and column spaces
    D = model[0].delta_matrix(["default"]).detach().double()
    W = model[0].base_module.weight.detach().double()
    P = torch.linalg.pinv(W) @ W  # projector on the row space
    assert (D - D @ P).norm() / D.norm() < 1e-5
    # the zero layer gets no update at all
    assert torch.equal(model[1].delta_matrix(["default"]), torch.zeros(8, 12))


def test_second_injection_hits_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDIFF_TOOLS_CACHE", str(tmp_path / "cache"))
    calls = []
    real = torch.linalg.eigh  # the default full-spectrum route is the Gram eigendecomposition
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 6))
    st.inject_adapter(copy.deepcopy(base), st.SVDAdapterConfig(method="vectorfit"))
    assert len(calls) == 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    st.inject_adapter(copy.deepcopy(base), st.SVDAdapterConfig(method="svdiff"))
    assert len(calls) == 2  # served from disk


def test_cache_can_be_disabled_and_survives_corrupt_entries(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDIFF_TOOLS_CACHE", "off")
    assert cache.cache_dir() is None
    monkeypatch.setenv("SVDIFF_TOOLS_CACHE", str(tmp_path))
    A = torch.randn(6, 5)
    key = cache.weight_digest(A) + "-full-float32"
    (tmp_path / f"{key}.safetensors").write_bytes(b"garbage")
    d = dec.decompose(A)
    torch.testing.assert_close(d.U @ torch.diag(d.S) @ d.V.T, A, rtol=1e-5, atol=1e-5)


def test_digest_distinguishes_dtype_and_values():
    A = torch.randn(4, 4)
    assert cache.weight_digest(A) == cache.weight_digest(A.clone())
    assert cache.weight_digest(A) != cache.weight_digest(A.half())
    B = A.clone()
    B[0, 0] += 1e-3
    assert cache.weight_digest(A) != cache.weight_digest(B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_is_exact_at_init_and_loads_fp32_adapter(dtype, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 16))
    model = copy.deepcopy(base)
    st.inject_adapter(model, st.SVDAdapterConfig(method="svdiff"))
    randomize_adapter(model, magnitude=0.05)
    path = st.save_adapter(model, tmp_path / "a.safetensors")
    x = torch.randn(4, 32)
    half_base = copy.deepcopy(base).to(dtype)
    half = copy.deepcopy(half_base)
    st.inject_adapter(half, st.SVDAdapterConfig(method="svdiff"), adapter_name="probe")
    assert torch.equal(half(x.to(dtype)), half_base(x.to(dtype)))  # exact at init in half precision
    st.remove_adapter(half)
    st.load_adapter(half, path)  # fingerprints tolerate the dtype change
    assert half[0].svd_adapters["default"].delta.dtype == torch.float32  # trainable tensors stay fp32
    rounding = rel_err(half_base(x.to(dtype)).float(), base(x))  # what the dtype alone costs
    out = half(x.to(dtype)).float()
    assert rel_err(out, model(x)) < 2 * rounding + 1e-3
    assert rel_err(out, base(x)) > 10 * rel_err(out, model(x))


def test_adapter_trained_on_bf16_weights_loads_exactly_into_fp32_model(tmp_path):
    """The loader rounds the fp32 weight to the recorded training dtype before decomposing, so even
    off-diagonal SVFT entries act on the training basis."""
    torch.manual_seed(0)
    base32 = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 16))
    trained = copy.deepcopy(base32).to(torch.bfloat16)
    st.inject_adapter(trained, st.SVDAdapterConfig(method="svft", svft_pattern="banded"))
    randomize_adapter(trained, magnitude=0.05)
    path = st.save_adapter(trained, tmp_path / "a.safetensors")
    fp32 = copy.deepcopy(base32)
    st.load_adapter(fp32, path)
    for i in (0, 2):
        (key_bf16,), (key_32,) = trained[i].bases.keys(), fp32[i].bases.keys()
        U_trained, U_loaded = trained[i].bases[key_bf16].U, fp32[i].bases[key_32].U
        assert U_loaded.dtype == torch.float32
        assert torch.equal(U_loaded.to(torch.bfloat16), U_trained)  # the very same decomposition
        # while decomposing the fp32 weight itself would have rotated the basis visibly
        direct = dec.full_svd(base32[i].weight.detach()).U
        assert (direct - U_loaded).abs().max() > 1e-2


def test_gram_route_stays_orthonormal_for_nearly_singular_matrices():
    """A square matrix whose smallest kept singular value is ~1e-6 * S_1: U = A V / S alone would be off by
    ~eps64 * (S_1 / S_min)^2; the re-orthonormalisation keeps it orthonormal and the product exact."""
    S = torch.logspace(0, -6, 64, dtype=torch.float64)
    U0, V0 = _matrix(64, 64, seed=8), _matrix(64, 64, seed=9)
    A = (torch.linalg.qr(U0).Q * S) @ torch.linalg.qr(V0).Q.T
    g = dec.gram_svd(A, torch.float64)
    n = dec.numerical_rank(g.S.float(), A.shape)
    assert n >= 60
    eye = torch.eye(n, dtype=torch.float64)
    assert (g.U[:, :n].T @ g.U[:, :n] - eye).abs().max() < 1e-12
    assert (g.V[:, :n].T @ g.V[:, :n] - eye).abs().max() < 1e-12
    assert rel_err((g.U[:, :n] * g.S[:n]) @ g.V[:, :n].T, A) < 1e-9
