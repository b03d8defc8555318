"""VectorFit's Adaptive Vector Freezing: it freezes exactly the vectors it chose, and they do not move."""

import copy

import torch
from torch import nn

import svdiff_tools as st


def _setup(k=3, interval=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4))
    st.inject_adapter(model, st.SVDAdapterConfig(method="vectorfit", avf_k=k, avf_interval=interval))
    opt = torch.optim.AdamW(st.get_parameter_groups(model, lr=1e-2, weight_decay=0.1))
    avf = st.AdaptiveVectorFreezing.from_model(model)
    avf.attach(opt)
    return model, opt, avf


def _train_step(model, opt, avf, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # zero tensors, not None: AVF must still stop the update
    avf.step()


def test_avf_freezes_the_strongest_vectors_and_keeps_them_bit_equal():
    model, opt, avf = _setup(k=3, interval=4)
    vectors = avf.vectors
    assert len(vectors) == 6  # a singular-value delta and a bias delta per layer
    for step in range(4):
        _train_step(model, opt, avf, step)
    # the choice equals an independent computation of mean |v - v0| (v0 = 0 for deltas)
    strength = {n: float(p.detach().abs().mean()) for n, p in vectors.items()}
    expected = sorted(strength, key=lambda n: -strength[n])[:3]
    assert sorted(avf.frozen) == sorted(expected)
    snapshot = {n: p.detach().clone() for n, p in vectors.items()}
    state = {id(p): copy.deepcopy(opt.state[p]) for p in vectors.values()}
    for step in range(4, 7):  # inside the freeze window (next refreeze at step 8)
        _train_step(model, opt, avf, step)
        for n in expected:
            assert torch.equal(vectors[n], snapshot[n]), n
            p = vectors[n]
            assert torch.equal(opt.state[p]["exp_avg"], state[id(p)]["exp_avg"])  # no momentum update
    moved = [n for n in vectors if n not in expected and not torch.equal(vectors[n], snapshot[n])]
    assert len(moved) == 3


def test_avf_state_round_trip():
    model, opt, avf = _setup()
    for step in range(8):
        _train_step(model, opt, avf, step)
    other = st.AdaptiveVectorFreezing.from_model(model)
    other.load_state_dict(avf.state_dict())
    assert other.frozen == avf.frozen and other.steps == avf.steps == 8
