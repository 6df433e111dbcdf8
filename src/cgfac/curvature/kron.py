"""The Kronecker-factored curvature ``F ≈ A ⊗ G`` of one layer, matrix-free and direct.

Factors are given by scaled rows, ``A = ãᵀã`` (``ã``: ``r_a × d_in``) and ``G = g̃ᵀg̃``
(``g̃``: ``r_g × d_out``), so a running average over batches is a weighted stack of rows. For a
batch of ``n`` samples with ``T`` rows each (KFC scaling)::

    ã = a / √(n·T)      A = aᵀa / (n·T)    (inputs averaged over samples and positions)
    g̃ = g / √n          G = gᵀg / n        (output gradients summed over positions)

The damped system of a layer is ``G X A + λ X = ∇W`` (``X``, ``∇W``: ``d_out × d_in``) with
``damping_form="exact"``, or with factored Tikhonov damping (Martens & Grosse 2015, §6.3;
``damping_form="factored"``) ``(G + γ_G I) X (A + γ_A I) = ∇W``, where ::

    π = √((tr(A)/d_in) / (tr(G)/d_out)),   γ_A = π √λ,   γ_G = √λ / π

(``π = 1`` when a trace is zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor
from torch.profiler import record_function

from cgfac.config import DampingForm, values
from cgfac.curvature.base import RowBlock

if TYPE_CHECKING:
    from cgfac.rows import Rows

DAMPING_FORMS = values(DampingForm)
"""The values of ``damping_form``: ``"exact"`` solves ``G X A + λX = ∇W``, ``"factored"``
``(G + γ_G I) X (A + γ_A I) = ∇W`` with ``γ_A = π√λ``, ``γ_G = √λ/π``."""


def factored_damping(trace_a: float, d_in: int, trace_g: float, d_out: int, damping: float) -> tuple[float, float]:
    """``(γ_A, γ_G)`` of factored Tikhonov damping: ``γ_A = π√λ``, ``γ_G = √λ/π`` with
    ``π = √((tr(A)/d_in) / (tr(G)/d_out))`` (``π = 1`` when either trace is not positive)."""
    mean_a, mean_g = trace_a / d_in, trace_g / d_out
    pi = (mean_a / mean_g) ** 0.5 if mean_a > 0 and mean_g > 0 else 1.0
    if not (pi == pi and 0 < pi < float("inf")):
        pi = 1.0
    root = damping**0.5
    return pi * root, root / pi


def factored_damping_tensor(trace_a: Tensor, d_in: int, trace_g: Tensor, d_out: int,
                            damping: float | Tensor) -> tuple[Tensor, Tensor]:
    """:func:`factored_damping` on 0-dim tensors, without a host read: ``π = 1`` where it is not
    finite and positive."""
    mean_a, mean_g = trace_a / d_in, trace_g / d_out
    pi = (mean_a / mean_g).sqrt()
    pi = torch.where((mean_a > 0) & (mean_g > 0) & torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
    root = torch.as_tensor(damping, dtype=pi.dtype, device=pi.device).sqrt()
    return pi * root, root / pi


@dataclass
class KronRows(RowBlock):
    """``A = aᵀa``, ``G = gᵀg`` held as rows ``a`` (``r_a × d_in``) and ``g`` (``r_g × d_out``)."""

    a: Tensor
    g: Tensor
    kind: ClassVar[str] = "kron"
    supports_lowrank: ClassVar[bool] = True

    @property
    def num_samples(self) -> int:
        """The rows (samples are folded into the rows' scaling)."""
        return self.a.shape[0]

    @classmethod
    def from_rows(cls, window: Sequence[Rows], weights: Sequence[float]) -> KronRows:
        """Stack batches with running-average weights: ``A = Σ_j w_j a_jᵀa_j/(n_j T_j)``, likewise G."""
        a = [r.a * (w / r.a.shape[0]) ** 0.5 for r, w in zip(window, weights)]
        g = [r.g * (w / r.n) ** 0.5 for r, w in zip(window, weights)]
        return cls(torch.cat(a), torch.cat(g))

    def factors(self, diagonal: tuple[bool, bool] = (False, False)) -> tuple[Tensor, Tensor]:
        """The explicit factors ``(A, G)``: ``O(r d²)`` time, ``O(d²)`` memory. ``diagonal``
        ``(in, out)``: that side's factor is only its diagonal, ``Σ_rows a²`` column-wise (a 1-D
        tensor of ``d`` numbers, ``O(r d)`` time): the cheaper forms of :mod:`cgfac.precondition.memory`."""
        a_factor = (self.a * self.a).sum(0) if diagonal[0] else self.a.T @ self.a
        g_factor = (self.g * self.g).sum(0) if diagonal[1] else self.g.T @ self.g
        return a_factor, g_factor

    def mean_diagonal(self) -> float:
        """``tr(A)·tr(G)/(d_in·d_out)``, the mean eigenvalue of ``A ⊗ G``."""
        return float((self.a * self.a).sum()) * float((self.g * self.g).sum()) / (self.a.shape[1] * self.g.shape[1])

    def trace_tensor(self) -> Tensor:
        """``tr(A)·tr(G) = tr(A ⊗ G)`` as a 0-dim tensor (no host read); bounds the largest eigenvalue."""
        return torch.linalg.vector_norm(self.a).square() * torch.linalg.vector_norm(self.g).square()

    def rank_bound(self) -> int:
        """``min(r_a, d_in)·min(r_g, d_out) ≥ rank(A ⊗ G)``: with few rows on a wide layer the
        curvature's non-zero spectrum is this small a part of its ``d_in·d_out`` dimensions."""
        return min(self.a.shape[0], self.a.shape[1]) * min(self.g.shape[0], self.g.shape[1])

    def factored_damping(self, damping: float) -> tuple[float, float]:
        """``(γ_A, γ_G)`` for this curvature (see :func:`factored_damping`)."""
        return factored_damping(float((self.a * self.a).sum()), self.a.shape[1],
                                float((self.g * self.g).sum()), self.g.shape[1], damping)

    def matvec(self, v: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``G V A + λV`` without forming ``A`` or ``G``; with ``form="factored"``
        ``(G + γ_G)V(A + γ_A) = GVA + γ_A GV + γ_G VA + γ_A γ_G V``.

        Two orders, both exact, the cheaper one is taken: through ``d_out × d_in``
        intermediates, ``GV = gᵀ(gV)`` then ``((GV)aᵀ)a`` (``2(r_g + r_a) d_in d_out``
        multiply-adds), or through the small ``r_g × r_a`` matrix ``M = (gV)aᵀ``, then
        ``(gᵀM)a`` (``(r_g + r_a) d_in d_out + r_g r_a (d_in + d_out)``).
        """
        a, g = self.a, self.g
        if form == "factored":
            gamma_a, gamma_g = self.factored_damping(damping)
            gv = g.T @ (g @ v)
            out = (gv @ a.T) @ a
            out.add_(gv, alpha=gamma_a).add_((v @ a.T) @ a, alpha=gamma_g)
            return out.add_(v, alpha=gamma_a * gamma_g)
        r_a, r_g = a.shape[0], g.shape[0]
        d_out, d_in = v.shape
        wide = (r_g + r_a) * d_in * d_out
        if r_g * r_a * (d_in + d_out) < wide:
            m = (g @ v) @ a.T  # r_g × r_a
            out = (g.T @ m) @ a
        else:
            gv = g.T @ (g @ v)  # G V
            out = (gv @ a.T) @ a
        return out.add_(v, alpha=damping)

    def jacobi(self, damping: float, form: str = "exact") -> Tensor:
        """``diag(G) diag(A)ᵀ + λ``: the diagonal of ``A ⊗ G + λI`` as a ``d_out × d_in`` matrix
        (factored: ``(diag G + γ_G)(diag A + γ_A)ᵀ``)."""
        dg = (self.g * self.g).sum(0)
        da = (self.a * self.a).sum(0)
        if form == "factored":
            gamma_a, gamma_g = factored_damping(float(da.sum()), da.shape[0], float(dg.sum()), dg.shape[0], damping)
            return torch.outer(dg + gamma_g, da + gamma_a)
        return torch.outer(dg, da).add_(damping)

    def solve_lowrank(self, grad: Tensor, damping: float, form: str = "exact", *, check: bool = True) -> Tensor:
        """Exact solve through each factor's non-zero eigenspace, from whichever is smaller.

        Each side is ``A = U diag(w) Uᵀ`` (:func:`factor_basis`): with ``r < d`` rows, ``U = aᵀV``
        from the ``r × r`` Gram ``a aᵀ = V diag(s) Vᵀ`` (``w = 1``, ``UᵀU = diag(s)``; no QR);
        otherwise ``U = Q`` from ``A = Q diag(s) Qᵀ`` (``w = s``). With ``t = s/‖u‖²`` (1 or ``s``)
        and ``C = U_Gᵀ ∇W U_A`` (``r_g × r_a``)::

            X = ∇W/λ − U_G [C ⊙ t_G t_Aᵀ ⊘ (λ (s_G s_Aᵀ + λ))] U_Aᵀ

        (exact: the directions outside the eigenspaces are the null space, where ``λX = ∇W``); no
        coefficient divides by ``s``, so eigenvalues near zero are harmless in float32. Factored
        damping is separable, each side through ``(A + γI)⁻¹ = I/γ − U diag(t/(γ(s + γ))) Uᵀ``.
        ``check``: of the eigendecompositions (:func:`eigh`).
        """
        s_a, u_a, t_a = factor_basis(self.a, check=check)
        s_g, u_g, t_g = factor_basis(self.g, check=check)
        with record_function("cgfac.lowrank.products"):
            if form == "factored":  # γ as tensors: no host read
                gamma_a, gamma_g = factored_damping_tensor(torch.linalg.vector_norm(self.a).square(), self.a.shape[1],
                                                           torch.linalg.vector_norm(self.g).square(), self.g.shape[1],
                                                           damping)
                # X = ∇W/(γ_G γ_A) + U_G D_G L/γ_A + (R D_A/γ_G + U_G D_G C D_A) U_Aᵀ with
                # D = −t/(γ(s + γ)), L = U_Gᵀ∇W, R = ∇W U_A, C = L U_A: four r·d_in·d_out products
                # and one pass over a d_out × d_in matrix besides them.
                d_g, d_a = -t_g / (gamma_g * (s_g + gamma_g)), -t_a / (gamma_a * (s_a + gamma_a))
                left = u_g.T @ grad
                right = grad @ u_a
                core = (d_g[:, None] * (left @ u_a)) * d_a
                out = u_g @ (d_g[:, None] * left / gamma_a)
                out.addmm_(right * (d_a / gamma_g) + u_g @ core, u_a.T)
                return out.addcdiv_(grad, gamma_g * gamma_a)
            c = (u_g.T @ grad) @ u_a
            inner = c * torch.outer(t_g, t_a) / ((torch.outer(s_g, s_a) + damping) * damping)
            out = (u_g @ inner) @ u_a.T
            if isinstance(damping, Tensor):
                return out.neg_().addcdiv_(grad, damping)
            return out.neg_().add_(grad, alpha=1 / damping)


def factor_basis(rows: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, U, t)`` with ``rowsᵀ rows = U diag(t) Uᵀ`` and ``UᵀU = diag(s/t)`` (``s``: the non-zero
    eigenvalues and zeros), for a low-rank solve.

    ``rows``: ``r × d``. With ``r < d``: the ``r × r`` Gram ``rows rowsᵀ = V diag(s) Vᵀ`` and
    ``U = rowsᵀ V`` (``d × r``; ``‖uᵢ‖² = sᵢ``), ``t = 1``: ``2 r² d`` multiply-adds and an ``r × r``
    eigendecomposition, no QR. These three run in float64 (then ``U`` is cast back): in the rows'
    float32, ``uᵢ`` of a small ``sᵢ`` would carry an error of ``ε√s_max`` along the top directions,
    which the solve's ``1/λ²``-sized coefficients amplify. ``U`` is never normalised
    (``Uσ^{-1/2}`` loses orthogonality for small ``σ``): the solves use coefficients that carry
    ``t/s`` themselves. Otherwise (``r ≥ d``) ``rowsᵀ rows = Q diag(s) Qᵀ``: ``U = Q``, ``t = s``.
    ``check``: of the eigendecomposition (:func:`eigh`).
    """
    if rows.shape[0] >= rows.shape[1]:
        s, q = eigh(rows.T @ rows, check=check)
        return s, q, s
    with record_function("cgfac.lowrank.gram"):
        wide = rows.double() if rows.dtype in (torch.float32, torch.float16, torch.bfloat16) else rows
        s, v = eigh(wide @ wide.T, check=check)
        u = (wide.T @ v).to(rows.dtype)
    return s.to(rows.dtype), u, torch.ones(s.shape, dtype=rows.dtype, device=rows.device)


def factor_eig(rows: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``rowsᵀ rows`` (``rows``: ``r × d``), at most ``min(r, d)`` of them.

    With ``r < d``: Householder QR ``rowsᵀ = Q R`` (``Q``: ``d × r`` orthonormal), then
    ``rowsᵀ rows = Q (R Rᵀ) Qᵀ`` and ``R Rᵀ = V diag(s) Vᵀ`` give ``(s, Q V)``, orthonormal to
    machine precision (the Gram route ``Q = rowsᵀ U σ^{-1/2}`` loses orthogonality for small
    ``σ``, and the low-rank formula then cancels catastrophically in float32). Otherwise the
    ``d × d`` factor itself is decomposed. ``check``: of the eigendecomposition (:func:`eigh`).
    """
    if rows.shape[0] >= rows.shape[1]:
        return eigh(rows.T @ rows, check=check)
    with record_function("cgfac.lowrank.qr"):
        q, r = torch.linalg.qr(rows.T)
    s, v = eigh(r @ r.T, check=check)
    return s, q @ v


def eigh(matrix: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition with eigenvalues clamped at 0.

    A failure (no convergence, non-finite output) is retried once in float64; a second failure
    raises ``torch.linalg.LinAlgError`` for the caller to handle. With ``check=False`` the result
    is not read back to the host to check it (no device synchronisation): only the failures that
    LAPACK or cuSOLVER report are retried, and the caller checks the finiteness of what it computes
    from it (CG-FAC's one-read step checks each direction, :class:`cgfac.solvers.SolverState`'s ``check``).
    """
    with record_function("cgfac.eigh"):
        try:
            s, q = torch.linalg.eigh(matrix)
            if check and not (torch.isfinite(s).all() and torch.isfinite(q).all()):
                raise torch.linalg.LinAlgError("non-finite eigendecomposition")
        except (torch.linalg.LinAlgError, RuntimeError):
            s, q = torch.linalg.eigh(matrix.double())
            if check and not (torch.isfinite(s).all() and torch.isfinite(q).all()):
                raise torch.linalg.LinAlgError("eigendecomposition failed in float64") from None
            s, q = s.to(matrix.dtype), q.to(matrix.dtype)
    return s.clamp_min(0), q


@dataclass
class KronEigen:
    """Eigendecomposed factors ``A = Q_A diag(s_A) Q_Aᵀ``, ``G = Q_G diag(s_G) Q_Gᵀ`` (K-FAC).

    A basis that is None is the identity: that factor is diagonal, ``diag(s)`` (the diagonal
    forms of :mod:`cgfac.precondition.memory`, for a side too wide to keep its ``d × d`` factor), and every
    formula below holds with ``Q = I`` (the basis change is skipped)."""

    s_a: Tensor
    q_a: Tensor | None
    s_g: Tensor
    q_g: Tensor | None

    @classmethod
    def from_factors(cls, a_factor: Tensor, g_factor: Tensor, *, check: bool = True) -> KronEigen:
        """Eigendecompose each factor; a 1-D factor is a diagonal one (its basis the identity).
        ``check``: of the eigendecompositions (:func:`eigh`)."""
        s_a, q_a = (a_factor.clamp_min(0), None) if a_factor.dim() == 1 else eigh(a_factor, check=check)
        s_g, q_g = (g_factor.clamp_min(0), None) if g_factor.dim() == 1 else eigh(g_factor, check=check)
        return cls(s_a, q_a, s_g, q_g)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], diagonal: tuple[bool, bool] = (False, False)) -> KronEigen:
        """Rebuild from :meth:`tensors` (``diagonal``: which sides, ``(in, out)``, have no basis)."""
        it = iter(tensors)
        s_a = next(it)
        q_a = None if diagonal[0] else next(it)
        s_g = next(it)
        q_g = None if diagonal[1] else next(it)
        return cls(s_a, q_a, s_g, q_g)

    @staticmethod
    def empty_tensors(a_factor: Tensor, g_factor: Tensor) -> list[Tensor]:
        """Zero tensors shaped like ``from_factors(a_factor, g_factor).tensors()`` (broadcast buffers)."""
        out = []
        for f in (a_factor, g_factor):
            out.append(f.new_zeros(f.shape[0]))
            if f.dim() == 2:
                out.append(torch.zeros_like(f))
        return out

    _inverses: tuple[float, Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def _to_basis(self, grad: Tensor) -> Tensor:
        """``Q_Gᵀ ∇W Q_A`` (an identity basis skipped)."""
        c = grad if self.q_g is None else self.q_g.T @ grad
        return c if self.q_a is None else c @ self.q_a

    def _from_basis(self, c: Tensor) -> Tensor:
        """``Q_G C Q_Aᵀ`` (an identity basis skipped)."""
        x = c if self.q_g is None else self.q_g @ c
        return x if self.q_a is None else x @ self.q_a.T

    def solve(self, grad: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ (s_G s_Aᵀ + λ)] Q_Aᵀ``; factored:
        ``X = Q_G [(Q_Gᵀ ∇W Q_A) ⊘ ((s_G + γ_G)(s_A + γ_A)ᵀ)] Q_Aᵀ = (G + γ_G I)⁻¹ ∇W (A + γ_A I)⁻¹``.

        Factored, when building the damped inverses ``Q diag(1/(s + γ)) Qᵀ`` costs at most twice
        the two basis changes each solve then saves (``d_in³ + d_out³ ≤ 2(d_out² d_in + d_out d_in²)``:
        square-ish layers, never very unequal sides), they are built once per ``λ`` and every solve
        at that ``λ`` is two products instead of four; a ``λ`` that changed every step would cost
        at most 1.5× the four products. The choice depends on shapes only, so a resumed run
        repeats it. A diagonal side (no basis) always takes the four-product route, where its
        basis changes cost nothing."""
        if form == "factored":
            d_in, d_out = self.s_a.shape[0], self.s_g.shape[0]
            dense = self.q_a is not None and self.q_g is not None
            if dense and d_in**3 + d_out**3 <= 2 * (d_out * d_out * d_in + d_out * d_in * d_in):
                assert self.q_a is not None and self.q_g is not None
                if self._inverses is None or self._inverses[0] != damping:
                    gamma_a, gamma_g = self._gammas(damping)
                    self._inverses = (damping, (self.q_a / (self.s_a + gamma_a)) @ self.q_a.T,
                                      (self.q_g / (self.s_g + gamma_g)) @ self.q_g.T)
                return self._inverses[2] @ grad @ self._inverses[1]
            gamma_a, gamma_g = self._gammas(damping)
            c = self._to_basis(grad)
            scale = torch.outer(self.s_g + gamma_g, self.s_a + gamma_a)
            return self._from_basis(c / scale if c is grad else c.div_(scale))
        c = self._to_basis(grad)
        scale = torch.outer(self.s_g, self.s_a).add_(damping)
        return self._from_basis(c / scale if c is grad else c.div_(scale))

    def mean_diagonal(self) -> float:
        """``tr(A)·tr(G)/(d_in·d_out)``, the mean eigenvalue of ``A ⊗ G``."""
        return float(self.s_a.mean()) * float(self.s_g.mean())

    def _gammas(self, damping: float) -> tuple[float, float]:
        return factored_damping(float(self.s_a.sum()), self.s_a.shape[0], float(self.s_g.sum()),
                                self.s_g.shape[0], damping)

    def tensors(self) -> tuple[Tensor, ...]:
        """``(s_A, Q_A, s_G, Q_G)``, an identity basis left out."""
        return tuple(t for t in (self.s_a, self.q_a, self.s_g, self.q_g) if t is not None)


@dataclass
class KronFactors:
    """``C V = G V A`` from explicit factors ``A`` (``d_in × d_in``) and ``G`` (``d_out × d_out``),
    e.g. K-FAC's running averages: a :class:`~cgfac.curvature.base.Curvature` that CG and the eigen
    solver accept (low-rank needs rows)."""

    a_factor: Tensor
    g_factor: Tensor
    kind: ClassVar[str] = "kron-factors"
    supports_lowrank: ClassVar[bool] = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.g_factor.shape[0], self.a_factor.shape[0]

    @property
    def num_rows(self) -> int:
        return self.a_factor.shape[0]

    @property
    def num_samples(self) -> int:
        return self.a_factor.shape[0]

    @property
    def row_counts(self) -> tuple[int, int]:
        """``(d_in, d_out)``: explicit factors keep no rows (a factor of width ``d`` has at most ``d``)."""
        return self.a_factor.shape[0], self.g_factor.shape[0]

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.a_factor, self.g_factor

    def solve_lowrank(self, grad: Tensor, damping: float, form: str = "exact", *, check: bool = True) -> Tensor:
        raise NotImplementedError("KronFactors keeps no rows: its low-rank solve is not available (eigen or CG)")

    def mean_diagonal(self) -> float:
        """``tr(A)·tr(G)/(d_in·d_out)``."""
        return float(self.a_factor.diagonal().mean()) * float(self.g_factor.diagonal().mean())

    def matvec(self, v: Tensor, damping: float, form: str = "exact") -> Tensor:
        """``G V A + λV`` (``2 d_in d_out (d_in + d_out)`` multiply-adds); factored:
        ``(G + γ_G I) V (A + γ_A I)``."""
        if form == "factored":
            gamma_a, gamma_g = factored_damping(float(self.a_factor.trace()), self.a_factor.shape[0],
                                                float(self.g_factor.trace()), self.g_factor.shape[0], damping)
            left = self.g_factor @ v + gamma_g * v
            return left @ self.a_factor + gamma_a * left
        return (self.g_factor @ v @ self.a_factor).add_(v, alpha=damping)

    def jacobi(self, damping: float, form: str = "exact") -> Tensor:
        """``diag(G) diag(A)ᵀ + λ`` (factored: ``(diag G + γ_G)(diag A + γ_A)ᵀ``)."""
        dg, da = self.g_factor.diagonal(), self.a_factor.diagonal()
        if form == "factored":
            gamma_a, gamma_g = factored_damping(float(da.sum()), da.shape[0], float(dg.sum()), dg.shape[0], damping)
            return torch.outer(dg + gamma_g, da + gamma_a)
        return torch.outer(dg, da).add_(damping)
