"""How each supported base module exposes its weight as a matrix and runs with a replaced weight.

Matrix conventions (``out x in``):
  Linear             weight (out, in)
  Conv1d/2d/3d       weight.reshape(out, -1): out x (in/groups * prod(kernel)), row-major as PyTorch stores it
  Embedding          weight (num_embeddings, embedding_dim): each row is a token's vector
  transformers Conv1D (GPT-2) weight (in, out) -> its transpose
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style layers; transformers is a dependency, but keep the core importable without it
    from transformers.pytorch_utils import Conv1D as HFConv1D
except Exception:  # pragma: no cover
    HFConv1D = None


class ModuleKind:
    name = "base"
    has_channels_last_bias = True  # the layer has a bias slot: last dim (Linear) or dim 1 (conv)
    stacked = False  # the wrapped module is a PEFT tuner layer around the real one
    stores_transposed = False  # the weight is kept as the transpose of the (out x in) matrix

    def __init__(self, module: nn.Module):
        self.module = module
        self._shape = None  # (out, in) of the matrix view, cached: shapes never change

    @property
    def matrix_shape(self) -> tuple:
        if self._shape is None:
            self._shape = tuple(self.matrix(self.module.weight).shape)
        return self._shape

    # --- shapes -------------------------------------------------------------------------
    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        return self.matrix_shape[0]

    @property
    def in_features(self) -> int:
        return self.matrix_shape[1]

    # --- compute ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def supports_factored(self) -> bool:
        return False

    def supports_input_correction(self) -> bool:
        """Whether ``forward(x + dx, W) = forward(x, W) + dx W^T`` with ``dx = project_out(z, P)`` for P
        (in x k): what a one-sided basis with U derived uses on the factored path (`LiveAdapter.factored`)."""
        return False

    def tokens(self, x: torch.Tensor) -> int:
        return max(1, x.numel() // max(1, self.in_features))

    def add_bias(self, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return y + bias

    def scale_channels(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``z`` with channel ``j`` (last dim; dim 1 for convs) multiplied by ``s[j]``."""
        return z * s


class LinearKind(ModuleKind):
    name = "linear"

    def matrix(self, weight):
        return weight

    def weight_from_matrix(self, matrix):
        return matrix

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def supports_factored(self):
        return True

    def supports_input_correction(self):
        return not self.stacked  # a LoRA layer underneath would see the corrected input too

    def project_in(self, x, Vt):  # x (..., in), Vt (r, in) -> (..., r)
        return F.linear(x, Vt)

    def project_out(self, z, U):  # z (..., r), U (out, r) -> (..., out)
        return F.linear(z, U)


class HFConv1DKind(LinearKind):
    name = "hf_conv1d"
    stores_transposed = True

    def matrix(self, weight):
        return weight.mT

    def weight_from_matrix(self, matrix):
        return matrix.mT

    def forward(self, x, weight, bias):  # as transformers' Conv1D.forward computes it (bit-equal at M = 0)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.mm(flat, weight) if bias is None else torch.addmm(bias, flat, weight)
        return out.view(*x.shape[:-1], weight.shape[-1])


class ConvKind(ModuleKind):
    name = "conv"

    def matrix(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def weight_from_matrix(self, matrix):
        return matrix.reshape(self.module.weight.shape)

    def forward(self, x, weight, bias):
        return self.module._conv_forward(x, weight, bias)

    def supports_factored(self):
        m = self.module
        return m.groups == 1 and m.padding_mode == "zeros"

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, unpadded, one group: the conv is the same matrix product at every position."""
        m = self.module
        unpadded = m.padding in ("valid", "same") or not any(m.padding)
        return m.groups == 1 and set(m.kernel_size) == {1} and set(m.stride) == {1} and unpadded

    def supports_input_correction(self):
        return self.pointwise

    def tokens(self, x):
        m = self.module
        spatial = x.shape[-len(m.kernel_size):]
        per_item = 1
        for size, stride in zip(spatial, m.stride):
            per_item *= max(1, math.ceil(size / stride))
        batch = x.numel() // max(1, m.in_channels * math.prod(spatial))
        return max(1, batch * per_item)

    def add_bias(self, y, bias):
        return y + bias.reshape(1, -1, *([1] * (y.dim() - 2)))

    def scale_channels(self, z, s):
        return z * s.reshape(1, -1, *([1] * (z.dim() - 2)))

    def _conv(self, x, weight, **kwargs):
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.module.kernel_size)]
        return fn(x, weight, None, **kwargs)

    @staticmethod
    def _channel_product(x, M):
        """``M @ x`` over the channels of one image: x (1, c, *sp), M (k, c) of any strides -> (1, k, *sp).
        One GEMM on the (c, positions) view, so neither a transposed or sliced ``M`` nor ``x`` is copied (a conv
        would copy a non-contiguous kernel on every call)."""
        return torch.mm(M, x[0].reshape(x.shape[1], -1)).reshape(1, M.shape[0], *x.shape[2:])

    def project_in(self, x, Vt):  # x (B, in, *sp), Vt (r, in*prod(kernel)) -> (B, r, *sp'): a conv with r kernels
        if x.shape[0] == 1 and self.pointwise:
            return self._channel_product(x, Vt)
        m = self.module
        kernel = Vt.reshape(Vt.shape[0], m.in_channels, *m.kernel_size)
        return self._conv(x, kernel, stride=m.stride, padding=m.padding, dilation=m.dilation)

    def project_out(self, z, U):  # z (B, r, *sp), U (out, r) -> (B, out, *sp): a 1x1 conv
        if z.shape[0] == 1:
            return self._channel_product(z, U)
        return self._conv(z, U.reshape(*U.shape, *([1] * len(self.module.kernel_size))))


class EmbeddingKind(ModuleKind):
    name = "embedding"
    has_channels_last_bias = False

    def matrix(self, weight):
        return weight

    def weight_from_matrix(self, matrix):
        return matrix

    @property
    def out_features(self):
        return self.module.num_embeddings

    @property
    def in_features(self):
        return self.module.embedding_dim

    def forward(self, x, weight, bias):
        m = self.module
        return F.embedding(x, weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _peft_base(module: nn.Module) -> nn.Module:
    """The plain layer inside a PEFT tuner layer (a LoRA loaded with ``load_lora_weights``), else itself."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover
        return module
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def kind_of(module: nn.Module) -> Optional[ModuleKind]:
    """The `ModuleKind` for a supported module (seen through a PEFT LoRA layer), else None.

    ``kind.stacked`` is True when ``module`` is such a tuner layer: its output is more than ``x W^T``, so an
    adapter on top must add its own term instead of replacing the weight.
    """
    inner = _peft_base(module)
    if isinstance(inner, nn.Linear):
        kind = LinearKind(inner)
    elif isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kind = ConvKind(inner)
    elif isinstance(inner, nn.Embedding):
        kind = EmbeddingKind(inner)
    elif HFConv1D is not None and isinstance(inner, HFConv1D):
        kind = HFConv1DKind(inner)
    else:
        return None
    kind.stacked = inner is not module
    return kind


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None
