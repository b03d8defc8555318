"""Independent float64 reference: rebuild the adapted weights from the definitions, not from the library.

The reference decomposes each base weight itself in float64, applies the sign rule as the design states
it (flip (u_i, v_i) so the largest-magnitude entry of u_i is positive), and builds M from the adapter's
raw trainable tensors with each method's formula.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from svdiff_tools.layer import NormDeltaLayer, SVDLayer
from svdiff_tools.model import adapter_layers


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """out x in view of a weight, as the design defines it (conv kernels flattened)."""
    w = module.weight.detach().double()
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer stores (in, out)
        return w.T
    return w.reshape(w.shape[0], -1)


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    if type(module).__name__ == "Conv1D":
        module.weight.data = matrix.T.contiguous()
    else:
        module.weight.data = matrix.reshape(module.weight.shape).contiguous()


def canonical_svd64(W: torch.Tensor):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.T.clone()
    U = U.clone()
    for i in range(U.shape[1]):
        j = int(U[:, i].abs().argmax())
        if U[j, i] < 0:
            U[:, i] *= -1
            V[:, i] *= -1
    return U, S, V


def middle64(method, S: torch.Tensor) -> torch.Tensor:
    r = method.rank
    if method.name == "svdiff":
        d = method.delta.detach().double()
        return torch.diag(torch.relu(S[:r] + d) - S[:r])
    if method.name in ("svfit", "vectorfit"):
        return torch.diag(method.delta.detach().double())
    if method.name == "svft":
        M = torch.zeros(r, r, dtype=torch.float64)
        M[method.rows, method.cols] = method.values.detach().double()
        return M
    raise AssertionError(method.name)


def delta64(layer: SVDLayer, adapter_name: str, scale: float | None = None) -> torch.Tensor:
    """scale * U_S M V_S^T in float64 for one adapted layer."""
    method = layer.svd_adapters[adapter_name]
    scale = layer.scales[adapter_name] if scale is None else scale
    U, S, V = canonical_svd64(weight_matrix(layer.base_module))
    r = method.rank
    return scale * U[:, :r] @ middle64(method, S) @ V[:, :r].T


def reference_model(base: nn.Module, adapted: nn.Module, adapter_names=("default",)) -> nn.Module:
    """A float64 copy of ``base`` with every adapter's update written into its weights."""
    ref = copy.deepcopy(base).double()
    for name, layer in adapter_layers(adapted):
        target = ref.get_submodule(name)
        for a in adapter_names:
            if isinstance(layer, SVDLayer) and a in layer.svd_adapters:
                set_weight_matrix(target, weight_matrix(target) + delta64(layer, a))
                b = layer.svd_adapters[a].bias()
                if b is not None:
                    extra = layer.scales[a] * b.detach().double()
                    target.bias = nn.Parameter(extra if target.bias is None else target.bias.detach() + extra)
            elif isinstance(layer, NormDeltaLayer) and a in layer.weight_deltas:
                target.weight.data = target.weight.detach() + layer.scales[a] * layer.weight_deltas[a].detach().double()
    return ref


def to_double(inputs: tuple) -> tuple:
    return tuple(x.double() if torch.is_floating_point(x) else x for x in inputs)


def randomize_adapter(model: nn.Module, adapter_name: str = "default", seed: int = 0, magnitude: float = 0.2) -> None:
    """Give every trainable tensor of an adapter random 'trained' values."""
    from svdiff_tools.model import adapter_parameters

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(model, adapter_name).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * magnitude)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
