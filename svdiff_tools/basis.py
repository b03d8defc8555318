"""The fixed singular basis of an adapted weight, one class per way of storing it.

For ``W = U diag(S) V^T`` (q components) an adapter of rank r uses ``U_r`` (out x r) and ``V_r`` (in x r).
Every storage answers the same questions for such an adapter, given the tensors `parts` returns for it:

  factored(x)      ``(dx, dy)`` with ``x (U M V^T)^T = dy + dx W^T``: the adapter's term through thin
                   projections (``dx`` is added to the base op's input, ``dy`` to its output)
  add_to(Wm)       ``Wm + alpha * U M V^T`` (recomposing the weight)
  full_factors(W)  ``U``, ``V`` whole (merges, exports, methods that read the basis)
  flops(r)         what the path cost model (`path_cost`) needs to choose between the two
  numel            what it stores

`TwoSidedBasis` stores ``U`` and ``V``. A one-sided basis stores the smaller factor whole and, of the larger
one, only its last ``q - head`` columns; the first ``head`` follow from the weight: `LeftBasis` (out <= in,
U stored) derives ``V_h = W^T U_h diag(1/S_h)``, `RightBasis` (out > in, V stored) ``U_h = W V_h diag(1/S_h)``.
U and V of a square weight each cost as much as the weight. Only well-conditioned components are derived
(``S_i >= S_1 / HEAD_CONDITION``): rounding in ``U_h^T W`` is ``~ eps * S_1``, so a derived column's relative
error is ``~ eps * S_1 / S_i <= HEAD_CONDITION * eps``; the rest (the tail) stay stored.

``V`` is always kept as the transpose of a contiguous (q x in) tensor, so the rows of ``V^T`` a projection
``x V`` reads are the contiguous weight of a Linear or the kernel of a conv (no copy per call).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Optional, Tuple

import torch
from torch import nn


class Parts(NamedTuple):
    """What one adapter of rank r reads from its basis: views computed once per state change.

    U: the stored columns of ``U_r`` (all r, or the tail for `RightBasis`); Vt: the stored rows of ``V_r^T``
    (all r, or the tail for `LeftBasis`); head: leading components whose larger-side vector is derived;
    inv_s (r,): ``1 / S_i`` on the head, then ones (None for two-sided)."""
    U: torch.Tensor
    Vt: torch.Tensor
    head: int = 0
    inv_s: Optional[torch.Tensor] = None


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no copy when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def _transposed_contiguous(V: torch.Tensor) -> torch.Tensor:
    """``V`` (in x q) as the transpose of a contiguous (q x in) copy (a new tensor, never a view of the input)."""
    return V.mT.clone(memory_format=torch.contiguous_format).mT


def addmm_t(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``C + alpha * A @ B`` computed as the transpose of ``C^T + alpha * B^T A^T`` (result laid out (n x m)),
    the layout of weights kept as (in, out) such as GPT-2's Conv1D."""
    return torch.addmm(C.mT, B.mT, A.mT, alpha=alpha).mT


def _diag_times(method, dtype: torch.dtype, d: Optional[torch.Tensor]) -> torch.Tensor:
    """``diag(M) * d`` (r,) in ``dtype`` (diagonal methods)."""
    m = as_dtype(method.diag_values(), dtype)
    return m if d is None else m * d


class SVDBasis(nn.Module):
    """Common state of every storage: ``U``, ``S``, ``V`` buffers and how they were computed (``driver``,
    ``svd_rank`` for a randomised top-r, ``weight_dtype`` of the decomposed matrix). Subclasses answer the
    questions in the module docstring."""

    storage: ClassVar[str] = ""
    head: int = 0
    right: ClassVar[bool] = False  # U is the derived factor (the stored, smaller one is V)
    reads_base_output: ClassVar[bool] = False  # factored path needs the base output without bias
    HEAD_CONDITION = 8.0
    AUTO_MIN_NUMEL = 1 << 18  # "auto": smaller weights stay two-sided (little memory, per-op overhead dominates)

    def __init__(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, driver: str,
                 svd_rank: Optional[int] = None, weight_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.driver = driver
        self.svd_rank = svd_rank
        self.weight_dtype = weight_dtype
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("S", S, persistent=False)
        self.register_buffer("V", _transposed_contiguous(V), persistent=False)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def worth_one_sided(cls, storage: str, shape: Tuple[int, int], input_correction: bool) -> bool:
        """Whether ``basis_storage`` asks for a one-sided basis of an (out x in) full-spectrum weight. "auto":
        where the weight has at least ``AUTO_MIN_NUMEL`` elements (below that the saving is small and the
        one-sided product's extra kernels cost more than its flops, measured on the CPU) and the factored path
        stays open: ``out <= in`` (`LeftBasis` reads ``x V_h`` from the base output), or ``out > in`` on a kind
        that takes an input correction (`RightBasis`), which rules out convolutions wider than 1x1."""
        out_f, in_f = shape
        factored = out_f <= in_f or input_correction
        return storage == "one_sided" or (storage == "auto" and factored and out_f * in_f >= cls.AUTO_MIN_NUMEL)

    @staticmethod
    def one_sided(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, driver: str,
                  svd_rank: Optional[int] = None, weight_dtype: Optional[torch.dtype] = None) -> "SVDBasis":
        """A `LeftBasis` or `RightBasis` (by shape) keeping the larger factor's tail; two-sided if no component
        is well-conditioned enough to derive."""
        top = float(S[0]) if S.numel() else 0.0
        head = int(((S > 0) & (S >= top / SVDBasis.HEAD_CONDITION)).sum()) if top > 0 else 0
        if head == 0:
            return TwoSidedBasis(U, S, V, driver, svd_rank, weight_dtype)
        if U.shape[0] > V.shape[0]:
            return RightBasis(U[:, head:].clone(), S, V, driver, svd_rank, weight_dtype, head)
        return LeftBasis(U, S, V[:, head:].clone(), driver, svd_rank, weight_dtype, head)

    def _info(self):
        return self.driver, self.svd_rank, self.weight_dtype

    # --- the questions ----------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.U.numel() + self.S.numel() + self.V.numel()

    def factored_on(self, kind) -> bool:
        """Whether the factored path can serve this basis on a layer of ``kind``."""
        return True

    def parts(self, r: int) -> Parts:
        raise NotImplementedError

    def full_factors(self, W: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` whole, derived columns computed in float64 from ``W`` (the unmerged base weight as an
        (out x in) matrix), in the stored dtype."""
        raise NotImplementedError

    def factored(self, parts: Parts, method, kind, x: torch.Tensor, y_nb: Optional[torch.Tensor]):
        raise NotImplementedError

    def add_to(self, parts: Parts, method, Wm: torch.Tensor, W0: torch.Tensor, alpha: float,
               transposed: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def flops(self, r: int, shape: Tuple[int, int]) -> Tuple[int, int, int]:
        """(recompose build flops, factored projection flops per token, thin kernels per pass) for rank r."""
        raise NotImplementedError

    def whole(self, W: Optional[torch.Tensor]) -> "TwoSidedBasis":
        """This basis with both factors stored (for a merge, which changes W); ``W`` is the unmerged weight."""
        return self


class TwoSidedBasis(SVDBasis):
    """``U`` (out x q) and ``V`` (in x q) both stored. ``restores``: the one-sided basis this one was made
    whole from for a merge (`whole`), returned to by `split` when the layer's last merge is undone."""

    storage = "both"

    def __init__(self, U, S, V, driver, svd_rank=None, weight_dtype=None, restores: Optional[tuple] = None):
        super().__init__(U, S, V, driver, svd_rank, weight_dtype)
        self.restores = restores  # (class, head) of the one-sided basis stored whole for a merge

    def parts(self, r):
        return Parts(self.U[:, :r], self.V[:, :r].mT)

    def full_factors(self, W):
        return self.U, self.V

    def factored(self, parts, method, kind, x, y_nb):
        return None, _left_terms(method, kind, x, y_nb, parts, x.dtype)

    def add_to(self, parts, method, Wm, W0, alpha, transposed=False):
        mm = addmm_t if transposed else torch.addmm
        return mm(Wm, method.mul_right(as_dtype(parts.U, Wm.dtype)), as_dtype(parts.Vt, Wm.dtype), alpha=alpha)

    def flops(self, r, shape):
        out_f, in_f = shape
        return out_f * in_f * r, (out_f + in_f) * r, 1

    def split(self) -> SVDBasis:
        """Back to the one-sided storage this basis was made whole from (after the merge is undone)."""
        if self.restores is None:
            return self
        cls, head = self.restores
        if cls is RightBasis:
            return RightBasis(self.U[:, head:].clone(), self.S, self.V, *self._info(), head)
        return LeftBasis(self.U, self.S, self.V[:, head:], *self._info(), head)


class _OneSided(SVDBasis):
    storage = "one_sided"

    def __init__(self, U, S, V, driver, svd_rank=None, weight_dtype=None, head: int = 0):
        super().__init__(U, S, V, driver, svd_rank, weight_dtype)
        self.head = int(head)

    def _inv_s(self, r: int) -> Tuple[int, torch.Tensor]:
        h = min(self.head, r)
        inv_s = torch.ones_like(self.S[:r])
        inv_s[:h] = 1.0 / self.S[:h]
        return h, inv_s

    def whole(self, W):
        U, V = self.full_factors(W)
        return TwoSidedBasis(U, self.S, V, *self._info(), restores=(type(self), self.head))

    def flops(self, r, shape):
        out_f, in_f = shape
        h = min(self.head, r)
        small, big = sorted(shape)
        build = out_f * in_f * (r - h) + small * small * (big + h)  # a small x small core, then the tail
        return build, (out_f + in_f) * r - (big - small) * h, 1 + (0 < h < r)


class LeftBasis(_OneSided):
    """One-sided, out <= in: ``U`` whole (out x q), of ``V`` only the tail; ``V_h = W^T U_h diag(1/S_h)``."""

    reads_base_output = True

    def parts(self, r):
        h, inv_s = self._inv_s(r)
        return Parts(self.U[:, :r], self.V[:, :max(r - self.head, 0)].mT, h, inv_s)

    def full_factors(self, W):
        h, inv = self.head, 1.0 / self.S[:self.head].double()
        derived = (W.double().mT @ self.U[:, :h].double()) * inv
        return self.U, torch.cat([derived.to(self.U.dtype), self.V], 1)

    def factored(self, parts, method, kind, x, y_nb):
        """``x V_h = (x W^T) U_h diag(1/S_h)`` is read from ``y_nb``, the base output without bias (``out``
        channels instead of ``in * prod(kernel)``)."""
        return None, _left_terms(method, kind, x, y_nb, parts, x.dtype)

    def add_to(self, parts, method, Wm, W0, alpha, transposed=False):
        """``U M V^T = [(U M)_h diag(1/S_h) U_h^T] W0 + (U M)_t V_t^T`` (an out x out core, then one GEMM)."""
        mm = addmm_t if transposed else torch.addmm
        dtype, h = Wm.dtype, parts.head
        U, Vt, inv = as_dtype(parts.U, dtype), as_dtype(parts.Vt, dtype), as_dtype(parts.inv_s[:h], dtype)
        QM = method.mul_right(U)  # U M (out x r)
        Wm = mm(Wm, (QM[:, :h] * inv) @ U[:, :h].mT, W0, alpha=alpha)
        return mm(Wm, QM[:, h:], Vt, alpha=alpha) if QM.shape[1] > h else Wm


class RightBasis(_OneSided):
    """One-sided, out > in: ``V`` whole (in x q), of ``U`` only the tail; ``U_h = W V_h diag(1/S_h)``."""

    right = True

    def factored_on(self, kind):
        return kind.supports_input_correction()

    def parts(self, r):
        h, inv_s = self._inv_s(r)
        return Parts(self.U[:, :max(r - self.head, 0)], self.V[:, :r].mT, h, inv_s)

    def full_factors(self, W):
        h, inv = self.head, 1.0 / self.S[:self.head].double()
        derived = (W.double() @ self.V[:, :h].double()) * inv
        return torch.cat([derived.to(self.V.dtype), self.U], 1), self.V

    def factored(self, parts, method, kind, x, y_nb):
        """The head's term is ``dx W^T`` with ``dx = x (M V^T)_h^T diag(1/S_h) V_h^T``, added to the base op's
        input (kinds with ``supports_input_correction``), so no second base-sized product; the tail's
        ``dy = x (M V^T)_t^T U_t^T``."""
        dtype, h = x.dtype, parts.head
        U, Vt, d = as_dtype(parts.U, dtype), as_dtype(parts.Vt, dtype), as_dtype(parts.inv_s, dtype)
        r = Vt.shape[0]
        md = _diag_times(method, dtype, d) if method.diagonal and kind.tokens(x) < Vt.shape[1] else None
        A = None  # diag(d) M V^T (r x in), built only with many tokens or a non-diagonal M

        def term(rows: slice, P: torch.Tensor) -> torch.Tensor:  # x (M V^T)_rows^T diag(d_rows) P^T
            nonlocal A
            if md is not None:  # few tokens: scale z (kept for backward) rather than build an r x in operand
                return kind.project_out(kind.scale_channels(kind.project_in(x, Vt[rows]), md[rows]), P)
            if A is None:
                A = method.mul_right(Vt.mT, transpose=True).mT * d[:, None]
            return kind.project_out(kind.project_in(x, A[rows]), P)

        return term(slice(0, h), Vt[:h].mT), (term(slice(h, r), U) if r > h else None)

    def add_to(self, parts, method, Wm, W0, alpha, transposed=False):
        """``U M V^T = W0 [V_h diag(1/S_h) (V M^T)_h^T] + U_t (V M^T)_t^T`` (an in x in core)."""
        mm = addmm_t if transposed else torch.addmm
        dtype, h = Wm.dtype, parts.head
        U, Vt, inv = as_dtype(parts.U, dtype), as_dtype(parts.Vt, dtype), as_dtype(parts.inv_s[:h], dtype)
        Q = Vt.mT
        QM = method.mul_right(Q, transpose=True)  # V M^T (in x r)
        Wm = mm(Wm, W0, (Q[:, :h] * inv) @ QM[:, :h].mT, alpha=alpha)
        return mm(Wm, U, QM[:, h:].mT, alpha=alpha) if QM.shape[1] > h else Wm


def _left_terms(method, kind, x, y_nb, parts: Parts, dtype):
    """``sum over parts of project_out(z, (U M diag(d))[:, cols])`` with ``z_h = y_nb U_h`` (a view of the
    basis; one-sided left) and ``z_t = x V_t``. Diagonal methods with few tokens scale ``z`` instead of
    building an out x r operand (which backward would keep)."""
    h = parts.head
    U, Vt = as_dtype(parts.U, dtype), as_dtype(parts.Vt, dtype)
    d = None if parts.inv_s is None else as_dtype(parts.inv_s, dtype)  # 1/S_h on the derived head, then ones
    zs = []
    if h:
        zs.append((kind.project_out(y_nb, U[:, :h].mT), slice(0, h)))
    if Vt.shape[0]:
        zs.append((kind.project_in(x, Vt), slice(h, U.shape[1])))
    out = UM = md = None
    for z, cols in zs:
        if method.diagonal and z.numel() < U[:, cols].numel():
            if md is None:
                md = _diag_times(method, dtype, d)
            term = kind.project_out(kind.scale_channels(z, md[cols]), U[:, cols])
        else:
            if UM is None:
                UM = method.mul_right(U) if d is None else method.mul_right(U) * d
            term = kind.project_out(z, UM[:, cols])
        out = term if out is None else out + term
    return out
