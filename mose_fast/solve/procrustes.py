"""The closed-form MOSE solve: weighted orthogonal Procrustes.

    min_R  λ‖R·W·K0 − W·K0‖²_F + ‖R·A_E − V_E‖²_F   s.t. RᵀR = I,     A_E = W·K_E

For orthogonal R, ‖R·X − Y‖² = ‖X‖² + ‖Y‖² − 2·tr(R·X·Yᵀ), so the problem is to maximise
tr(Rᵀ·M) with

    M = λ·P + V_E·A_Eᵀ ,    P = W·C0·Wᵀ  (C0 = E[k kᵀ], the retention Gram)

whose maximiser is the polar factor R = U·Vᵀ of M = U·Σ·Vᵀ (Schönemann 1966).  The objective
is evaluated without K0 as  λ·(2·tr P − 2·tr(R·P)) + ‖R·A_E − V_E‖²  (tr(R·P·Rᵀ) = tr P).

This module is the float64 torch reference for every step; the accelerated polar factors and
the fused cross-covariance live in ``mose_fast.kernels`` and are chosen by ``mose_fast.backends``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import full_precision_matmul
from .polar import POLAR_METHODS, newton_schulz_step, polar_cupy, polar_svd


@dataclass
class SolveResult:
    R: torch.Tensor | None     # (d_out × d_out) orthogonal, in the solve dtype (None: factored solve)
    objective: float           # Procrustes objective at R
    objective_identity: float  # ... at R = I (no edit), for reference
    orth_error: float          # ‖RᵀR − I‖_F


def cross_covariance(P: torch.Tensor, V: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
    """M = λ·P + V·Aᵀ (torch reference; columns of V, A are the edited values and outputs)."""
    return torch.addmm(P, V, A.T, beta=lam, alpha=1.0)


def objective(R: torch.Tensor, P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float,
              retention_trace: float | None = None) -> float:
    """λ‖R·W·K0 − Y0‖² (mean over corpus tokens) + ‖R·A − V‖², for orthogonal R.

    With Y0 = W·K0 (retain the current function) P = W·C0·Wᵀ and the retention term is
    2·(tr P − tr(Rᵀ·P)).  In general P = Y0-side cross Gram (e.g. W0·C0·Wᵀ to retain the unedited
    function) and the constant is ‖W·K0‖² + ‖Y0‖² over 2, passed as ``retention_trace``."""
    c = torch.trace(P) if retention_trace is None else retention_trace
    retention = 2.0 * (c - (R * P).sum())          # (R * P).sum() = tr(Rᵀ·P), P need not be symmetric
    fit = (R @ A - V).pow(2).sum()
    return float(lam * retention + fit)


def orthogonality_error(R: torch.Tensor) -> float:
    """‖RᵀR − I‖_F with RᵀR formed in float64 from R's entries, whatever R's dtype and the global
    float32 matmul precision: a float32 (let alone TF32) RᵀR carries rounding of its own of ~1e-7
    (~1e-3 in TF32) per entry, as large as the error it is to measure."""
    R64 = R.detach().to(torch.float64)
    G = R64.T @ R64                 # float64 products never run in TF32
    G.diagonal().sub_(1.0)
    return float(torch.linalg.matrix_norm(G))


# Methods that never form the d_out × d_out M (see solve_subspace), with their subspace settings:
# "subspace" rotates span[A_E, V_E] only; "krylov" adds 32 block-Arnoldi steps on P; "randomized"
# adds P's top eigenvectors from a randomized range finder and 2 Krylov blocks.  Settings chosen
# from the accuracy table in benchmarks/RESULTS.md (benchmarks/polar_accuracy.py).
SUBSPACE_METHODS: dict[str, dict] = {
    "subspace": {},
    "krylov": {"krylov_depth": 32},
    "randomized": {"krylov_depth": 2, "random_rank": 128},
}


@dataclass
class SubspaceSolve:
    Q: torch.Tensor           # (d_out × k) orthonormal basis of span[A_E, V_E]
    Rk: torch.Tensor          # (k × k) orthogonal: R = I + Q·(Rk − I)·Qᵀ
    objective: float
    objective_identity: float
    orth_error: float         # ‖RkᵀRk − I‖_F (= ‖RᵀR − I‖_F when Q is orthonormal)

    def full(self) -> torch.Tensor:
        eye = torch.eye(self.Q.shape[0], dtype=self.Q.dtype, device=self.Q.device)
        return eye + self.Q @ (self.Rk - torch.eye(self.Rk.shape[0], dtype=self.Rk.dtype,
                                                   device=self.Rk.device)) @ self.Q.T


def _orthonormal_basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of X, dropping numerically dependent directions."""
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    if not S.numel() or S[0] <= 0:
        return U[:, :0]
    return U[:, S > S[0] * X.shape[0] * torch.finfo(X.dtype).eps]


def _extend_rows(Qt: torch.Tensor, Yt: torch.Tensor) -> torch.Tensor:
    """The rows to add to the orthonormal rows ``Qt`` (k × d) so that they also span the part of the
    rows ``Yt`` (m × d) outside them: classical Gram–Schmidt applied twice ("twice is enough"), so
    powers of P do not collapse onto its top eigenvectors and each Krylov block really adds
    directions; numerically dependent directions are dropped.

    The basis is kept as rows because the products it takes part in are narrow (m ≈ 2n columns
    against d): MKL forms Yᵀ·Q and (Yᵀ·Q)·Qᵀ 2–3× faster in this layout than Qᵀ·Y and Q·(Qᵀ·Y)."""
    scale = float(Yt.abs().max()) if Yt.numel() else 0.0
    if scale == 0.0:
        return Yt[:0]
    for _ in range(2):
        Yt = Yt - (Yt @ Qt.T) @ Qt
    U, S, _ = torch.linalg.svd(Yt.T, full_matrices=False)
    return U[:, S > scale * Yt.shape[1] * torch.finfo(Yt.dtype).eps * 10].T


def _rows_times(P, Xt: torch.Tensor) -> torch.Tensor:
    """(P·X)ᵀ = Xᵀ·Pᵀ for X given as rows Xᵀ (m × d): the narrow product in the layout MKL runs
    fastest (2.2 ms against 4.8 for P·X at d = 1536, m = 20, float64)."""
    if isinstance(P, torch.Tensor):
        return Xt @ P.T
    return P.rows_times(Xt)


def _top_eigenvectors(P, rank: int, dtype: torch.dtype, device, niter: int = 2, oversample: int = 10) -> torch.Tensor:
    """The top-``rank`` eigenvectors of a symmetric positive semidefinite operator from a Gaussian
    sketch with ``niter`` power iterations (Halko et al. 2011, as ``torch.svd_lowrank`` does for a
    matrix), using only products ``P @ X``."""
    d = P.shape[0]
    k = min(d, rank + oversample)
    Y = P @ torch.randn(d, k, dtype=dtype, device=device)
    for _ in range(niter):
        Y = P @ torch.linalg.qr(Y)[0]
    B = torch.linalg.qr(Y)[0]
    evals, evecs = torch.linalg.eigh(B.T @ (P @ B))
    return B @ evecs[:, evals.argsort(descending=True)[:rank]]


@full_precision_matmul()   # no TF32 in the products that decide orthogonality
def solve_subspace(P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float,
                   dtype: torch.dtype = torch.float64, krylov_depth: int = 0, random_rank: int = 0,
                   seed: int = 0, retention_trace: float | None = None) -> SubspaceSolve:
    """The optimum over rotations that act only on a subspace S ⊇ span[A_E, V_E] (identity on S⊥).

    With R = I − Q·Qᵀ + Q·Rk·Qᵀ,  tr(Rᵀ·M) = const + tr(Rkᵀ·Qᵀ·M·Q),  so Rk is the polar factor of
    the k × k matrix  Qᵀ·M·Q = λ·(Qᵀ·P·Q) + (Qᵀ·V)(Qᵀ·A)ᵀ.  Cost O(d_out²·k) for P·Q instead of
    O(d_out³); the apply is the factored W ← W + Q·((Rk − I)·(Qᵀ·W)).

    S = span[A_E, V_E] alone (k ≤ 2n) is exact for the edit term but not for the retention term:
    the full optimum also turns directions that P couples to S.  Two enlargements recover them,
    and the optimum over a larger S can only be better (its family of rotations contains the
    smaller one's):
      * ``krylov_depth`` q: add P·B, P²·B, …, P^q·B (B the basis of span[A_E, V_E]);
      * ``random_rank`` r: add the top-r eigenvectors of P from a randomized range finder
        (``torch.svd_lowrank``, Halko et al. 2011: Gaussian sketch, two power iterations, small
        SVD) — the directions where retention weighs most.
    With S = everything, this is the exact solve.
    """
    dense = isinstance(P, torch.Tensor)      # else an operator: P @ X, P.shape, P.trace(), P.device
    if dense:
        P = P.to(dtype)
    A, V = A.to(dtype), V.to(dtype)
    for name, t in ((("P", P),) if dense else ()) + (("A_E", A), ("V_E", V)):
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite values in {name}; refusing to rotate")
    if krylov_depth < 0 or random_rank < 0:
        raise ValueError(f"krylov_depth and random_rank must be ≥ 0, got {krylov_depth}, {random_rank}")
    # the basis of S as orthonormal rows Qᵀ in a buffer, and P·Q as rows (P·Q)ᵀ as the Arnoldi forms them
    start = _orthonormal_basis(torch.cat([A, V], 1)).T
    if random_rank:
        rank = min(random_rank, P.shape[0])
        cuda = P.device.type == "cuda"
        with torch.random.fork_rng(devices=[P.device] if cuda else []):
            torch.manual_seed(seed)          # reproducible sketch; the caller's RNG is untouched
            U_top = (torch.svd_lowrank(P, q=rank, niter=2)[0] if dense
                     else _top_eigenvectors(P, rank, A.dtype, A.device))
        start = torch.cat([start, _extend_rows(start, U_top.T.contiguous())])
    d = P.shape[0]
    rows = torch.empty(min(d, start.shape[0] * (krylov_depth + 1)), d, dtype=dtype, device=A.device)
    rows[:start.shape[0]] = start
    k, block = start.shape[0], start
    products = []
    for _ in range(krylov_depth):            # block Arnoldi on P from the basis so far
        if k >= d:
            break
        products.append(_rows_times(P, block))
        new = _extend_rows(rows[:k], products[-1])[:rows.shape[0] - k]
        if not new.shape[0]:                 # invariant subspace reached
            break
        rows[k:k + new.shape[0]] = new
        block, k = rows[k:k + new.shape[0]], k + new.shape[0]
    Qt = rows[:k]
    done = sum(p.shape[0] for p in products)
    if done < k:
        products.append(_rows_times(P, Qt[done:]))
    PQt = torch.cat(products)[:k] if products else Qt.new_zeros((0, d))
    QtPQ = Qt @ PQt.T
    Q = Qt.T
    QtA, QtV = Q.T @ A, Q.T @ V
    Mk = lam * QtPQ + QtV @ QtA.T
    Rk = newton_schulz_step(polar_svd(Mk))
    eye_k = torch.eye(Rk.shape[0], dtype=dtype, device=Rk.device)

    trace = float(torch.trace(P)) if dense else P.trace()
    c = 0.0 if retention_trace is None else float(retention_trace - trace)

    def obj(Rk_):   # λ·2·(c − tr(Rᵀ·P)) with tr(Rᵀ·P) = tr P + tr((Rk − I)ᵀ·Qᵀ·P·Q), plus the fit
        return float(lam * 2.0 * (c - ((Rk_ - eye_k) * QtPQ).sum()) + (Rk_ @ QtA - QtV).pow(2).sum())
    return SubspaceSolve(Q=Q, Rk=Rk, objective=obj(Rk), objective_identity=obj(eye_k),
                         orth_error=orthogonality_error(Rk))


@full_precision_matmul()   # no TF32 in the products that decide orthogonality
def solve_rotation(P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float,
                   method: str = "svd", dtype: torch.dtype = torch.float64,
                   retention_trace: float | None = None) -> SolveResult:
    """The MOSE rotation for one layer.

    P: (d_out × d_out) retention Gram W·C0·Wᵀ (or any retention cross Gram, see ``objective``);
    A, V: (d_out × n) current outputs W·K_E and target values.  Computed in ``dtype`` (float64 by
    default) and re-orthonormalised there, so R is orthogonal to ~1e-15 whatever the method's own
    accuracy.
    """
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown polar method {method!r}; choose from {sorted(POLAR_METHODS)}")
    polar = POLAR_METHODS[method]
    if method == "svd" and P.is_cuda:
        from ..backends import choose
        if choose("polar", P) == "cupy":      # MOSE_BACKEND_POLAR=cupy: cuSOLVER gesvd via CuPy
            polar = polar_cupy
    if P.shape[0] != P.shape[1] or A.shape != V.shape or A.shape[0] != P.shape[0]:
        raise ValueError(f"shape mismatch: P {tuple(P.shape)}, A {tuple(A.shape)}, V {tuple(V.shape)}")
    P, A, V = P.to(dtype), A.to(dtype), V.to(dtype)
    for name, t in (("P", P), ("A_E", A), ("V_E", V)):
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite values in {name}; refusing to rotate")
    M = None
    if dtype == torch.float32 and P.is_cuda:
        from ..backends import choose
        if choose("crosscov", P) == "triton":   # fused λ·P + V·Aᵀ in one pass over P
            from mose_fast.kernels.crosscov import crosscov
            M = crosscov(V, A, P, alpha=1.0, beta=lam)
    if M is None:
        M = cross_covariance(P, V, A, lam)
    R = polar(M)
    if method != "svd" or dtype != torch.float64:
        R = newton_schulz_step(R)   # re-orthonormalise in `dtype` before R touches any weight
    # (a float64 SVD's U·Vᵀ is orthogonal to ~1e-14 already: the step would change R by that much)
    eye = torch.eye(P.shape[0], dtype=dtype, device=P.device)
    return SolveResult(R=R, objective=objective(R, P, A, V, lam, retention_trace),
                       objective_identity=objective(eye, P, A, V, lam, retention_trace),
                       orth_error=orthogonality_error(R))
