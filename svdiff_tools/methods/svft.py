"""SVFT (Lingam et al., 2024): a sparse trainable M over the singular basis.

``M[rows, cols] = values`` with ``values`` (nnz,) trainable, zero at init. Patterns over the r x r grid:
  plain   the diagonal (nnz = r)
  banded  |i - j| <= d          (nnz = r(2d+1) - d(d+1), d = svft_offset, capped at r - 1)
  random  the banded count of positions drawn uniformly without replacement (seeded by svft_seed)
  top_k   the banded count of positions with the largest alignment |u_i . v_j|, computed on the
          canonical-sign basis over the first min(out, in) coordinates (exactly u_i . v_j when square)
The chosen ``rows``/``cols`` are saved with the adapter, so loading never re-derives them.
"""

import torch
from torch import nn

from .base import Option, SpectralMethod, register

PATTERNS = ("plain", "banded", "random", "top_k")


def banded_count(r: int, d: int) -> int:
    d = min(d, max(r - 1, 0))
    return r * (2 * d + 1) - d * (d + 1)


def pattern_indices(pattern: str, r: int, offset: int, seed: int, U=None, V=None):
    """(rows, cols) long tensors of the non-zero positions of M, row-major sorted."""
    if pattern == "plain" or r == 0:
        idx = torch.arange(r)
        return idx, idx.clone()
    count = banded_count(r, offset)
    if pattern == "banded":
        i, j = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        mask = (i - j).abs() <= min(offset, r - 1)
        return i[mask], j[mask]
    if pattern == "random":
        gen = torch.Generator().manual_seed(seed)
        flat = torch.randperm(r * r, generator=gen)[:count]
    elif pattern == "top_k":
        k = min(U.shape[0], V.shape[0])
        align = (U[:k, :r].double().mT @ V[:k, :r].double()).abs().cpu()
        flat = torch.argsort(align.reshape(-1), descending=True, stable=True)[:count]
    else:  # pragma: no cover - the config validates patterns
        raise ValueError(pattern)
    flat = flat.sort().values
    return flat // r, flat % r


@register
class SVFT(SpectralMethod):
    name = "svft"
    rank_forms = ("top_r",)
    default_lr = 5e-3
    lr_source = "SVFT paper (Lingam et al. 2024): ~5e-3 for banded patterns, ~5e-2 for plain"
    PLAIN_LR = 5e-2
    options = (
        Option("svft_pattern", str, "banded", "SVFT: the sparsity pattern of M", choices=PATTERNS),
        Option("svft_offset", int, 2, "SVFT band offset d (banded/random/top_k counts)", minimum=0),
        Option("svft_seed", int, 0, "SVFT: the seed of the random pattern", minimum=0),
    )

    @classmethod
    def learning_rate(cls, config):
        return cls.PLAIN_LR if config.svft_pattern == "plain" else cls.default_lr

    @classmethod
    def trainable_count(cls, rank, out_features, config):
        nnz = rank if config.svft_pattern == "plain" else banded_count(rank, config.svft_offset)
        return nnz + (out_features if config.trains_bias and out_features is not None else 0)

    @classmethod
    def needs_factors(cls, config):
        return config.svft_pattern == "top_k"

    def state_problem(self, state):
        rows, cols = state.get("rows"), state.get("cols")
        if rows is not None and rows.numel() and (min(int(rows.min()), int(cols.min())) < 0
                                                 or max(int(rows.max()), int(cols.max())) >= self.rank):
            return f"SVFT indices (rows/cols) fall outside its rank {self.rank}"
        return None

    def __init__(self, sigma, config, out_features, U=None, V=None):
        super().__init__(sigma, config, out_features)
        self.diagonal = config.svft_pattern == "plain"
        rows, cols = pattern_indices(config.svft_pattern, self.rank, config.svft_offset, config.svft_seed, U, V)
        self.register_buffer("rows", rows.to(torch.int64))
        self.register_buffer("cols", cols.to(torch.int64))
        self.values = nn.Parameter(torch.zeros(rows.shape[0]))

    def diag_values(self):
        if not self.diagonal:
            raise RuntimeError("diag_values() is only defined for the plain SVFT pattern")
        return self.values

    DENSE_RANK = 64  # up to this r, X @ dense(M) (one small GEMM) beats index_select + index_add

    def mul_right(self, X, transpose=False):
        if self.diagonal:
            return X * self.values.to(X.dtype)
        if self.rank <= self.DENSE_RANK:
            M = self.dense().to(X.dtype)
            return X @ (M.mT if transpose else M)
        rows, cols = (self.cols, self.rows) if transpose else (self.rows, self.cols)
        src = X.index_select(-1, rows) * self.values.to(X.dtype)
        return torch.zeros_like(X).index_add(-1, cols, src)

    def dense(self):
        M = torch.zeros(self.rank, self.rank, device=self.values.device)
        return M.index_put((self.rows, self.cols), self.values.float())
