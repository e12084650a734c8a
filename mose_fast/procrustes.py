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
import math
from typing import Callable

import torch


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
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return float(torch.linalg.matrix_norm(R.T @ R - eye))


# --- polar-factor methods: M ↦ R = U·Vᵀ --------------------------------------------------------

def polar_svd(M: torch.Tensor) -> torch.Tensor:
    """Exact: R = U·Vᵀ from the full SVD of M."""
    U, _, Vh = torch.linalg.svd(M)
    return U @ Vh


def polar_eigh(M: torch.Tensor) -> torch.Tensor:
    """Eigen route: MᵀM = Q·Σ²·Qᵀ, R = M·Q·Σ⁻¹·Qᵀ.  Squares the condition number, so it is only
    accurate when M is well conditioned (λ·P dominant and full rank); finished by one
    Newton–Schulz step to restore orthogonality lost to that squaring."""
    evals, Q = torch.linalg.eigh(M.T @ M)
    inv_sigma = evals.clamp_min(torch.finfo(M.dtype).tiny).rsqrt()
    R = (M @ Q) * inv_sigma
    return newton_schulz_step(R @ Q.T)


def polar_newton_schulz(M: torch.Tensor, steps: int = 60, tol: float | None = None) -> torch.Tensor:
    """Matmul-only iteration X ← X·(3I − XᵀX)/2 from X₀ = M/‖M‖_F (converges for full-rank M;
    slowly for directions with tiny singular values)."""
    X = M / torch.linalg.matrix_norm(M)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    tol = tol if tol is not None else 10 * torch.finfo(M.dtype).eps * M.shape[0]
    for _ in range(steps):
        X = newton_schulz_step(X, eye)
        if torch.linalg.matrix_norm(X.T @ X - eye) < tol:
            break
    return X


def polar_newton_schulz_fp32(M: torch.Tensor) -> torch.Tensor:
    """Newton–Schulz in float32 (the fast matmul precision), finished in M's dtype: two
    full-precision steps take ‖XᵀX − I‖ from float32 level (~1e-6) to float64 level."""
    X = polar_newton_schulz(M.to(torch.float32), steps=80, tol=1e-5).to(M.dtype)
    return newton_schulz_step(newton_schulz_step(X))


def optimal_cubic(lo: float) -> tuple[float, float, float]:
    """The odd cubic p(x) = a·x − b·x³ closest to 1 in the max norm on [lo, 1], and its error e.

    Equioscillation at lo, at the maximum x* of p (p'(x*) = 0, so a = 3·b·x*²) and at 1:
    1 − p(lo) = e, p(x*) − 1 = e, 1 − p(1) = e.  The first and last give a = b·(1 + lo + lo²), hence
    x*² = (1 + lo + lo²)/3; adding the middle one to the last gives b = 2/(lo + lo² + 2·x*³).
    At lo = 1 this is Newton–Schulz (a = 3/2, b = 1/2); for small lo it grows small singular values
    by a/(1 + e) → 3·√3/2 ≈ 2.6 per step instead of 1.5 (the degree-3 case of Polar Express,
    Amsel et al. 2025, derived here in closed form)."""
    xs = math.sqrt((1.0 + lo + lo * lo) / 3.0)
    b = 2.0 / (lo + lo * lo + 2.0 * xs ** 3)
    a = b * (1.0 + lo + lo * lo)
    e = 1.0 - (a - b)
    return a, b, e


def polar_express(M: torch.Tensor, lo: float = 1e-6, steps: int = 60, tol: float | None = None) -> torch.Tensor:
    """Matmul-only polar factor with the per-step minimax cubic of ``optimal_cubic``.

    X₀ = M/‖M‖_F puts every singular value in (0, 1]; ``lo`` is a guess of σ_min/‖M‖_F (a wrong
    guess costs steps, not correctness: values below it still grow by ≥ a per step).  Each step
    maps [lo, 1] into [1 − e, 1 + e]; dividing by 1 + e keeps the top at 1, and the new interval is
    [(1 − e)/(1 + e), 1].  Once the interval reaches [0.9, 1] the minimax cubic is within 1 % of
    Newton–Schulz, which takes over and converges quadratically."""
    X = M / torch.linalg.matrix_norm(M)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    tol = tol if tol is not None else 10 * torch.finfo(M.dtype).eps * M.shape[0]
    for _ in range(steps):
        if lo < 0.9:
            a, b, e = optimal_cubic(lo)
            # rounding can push a singular value slightly past the interval's top; a 1 % cushion
            # on the normalisation keeps every value where the next cubic still maps it up to 1
            scale = 1.0 / ((1.0 + e) * 1.01)
            X = X @ ((a * scale) * eye - (b * scale) * (X.T @ X))
            lo = (1.0 - e) / ((1.0 + e) * 1.01)
            continue
        G = X.T @ X          # one Gram per step serves both the convergence test and the step
        if torch.linalg.matrix_norm(G - eye) < tol:
            break
        X = X @ (1.5 * eye - 0.5 * G)
    return X


def polar_express_fp32(M: torch.Tensor) -> torch.Tensor:
    """Polar Express in float32, finished by two Newton–Schulz steps in M's dtype."""
    X = polar_express(M.to(torch.float32), steps=40, tol=1e-5).to(M.dtype)
    return newton_schulz_step(newton_schulz_step(X))


def newton_schulz_step(R: torch.Tensor, eye: torch.Tensor | None = None) -> torch.Tensor:
    """One step towards the nearest orthogonal matrix; squares a small ‖RᵀR − I‖."""
    if eye is None:
        eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return R @ (1.5 * eye - 0.5 * (R.T @ R))


def polar_cupy(M: torch.Tensor, driver: str = "gesvd") -> torch.Tensor:
    """cuSOLVER through CuPy, zero-copy via DLPack: ``gesvd`` (QR-based) or ``gesvdj`` (Jacobi).
    CUDA tensors only; CuPy is the [gpu] extra."""
    if not M.is_cuda:
        raise ValueError("the cupy polar methods need a CUDA tensor")
    import cupy
    m = cupy.from_dlpack(M.contiguous())
    if driver == "gesvdj":
        from cupyx.cusolver import gesvdj
        u, _, vh = gesvdj(m, full_matrices=True, overwrite_a=False)
    else:
        u, _, vh = cupy.linalg.svd(m, full_matrices=True)     # cusolverDn<t>gesvd
    return torch.from_dlpack(u @ vh)


POLAR_METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "svd": polar_svd,
    "eigh": polar_eigh,
    "newton_schulz": polar_newton_schulz,
    "newton_schulz_fp32": polar_newton_schulz_fp32,
    "polar_express": polar_express,
    "polar_express_fp32": polar_express_fp32,
    "cupy_gesvd": lambda M: polar_cupy(M, "gesvd"),
    "cupy_gesvdj": lambda M: polar_cupy(M, "gesvdj"),
}
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
        return eye + self.Q @ (self.Rk - torch.eye(self.Rk.shape[0], dtype=self.Rk.dtype, device=self.Rk.device)) @ self.Q.T


def _orthonormal_basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of X, dropping numerically dependent directions."""
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    if not S.numel() or S[0] <= 0:
        return U[:, :0]
    return U[:, S > S[0] * X.shape[0] * torch.finfo(X.dtype).eps]


def _extend_basis(Q: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """[Q, new] orthonormal, with ``new`` spanning the part of Y outside span(Q): classical
    Gram–Schmidt applied twice ("twice is enough"), so powers of P do not collapse onto its top
    eigenvectors and each Krylov block really adds directions."""
    scale = float(Y.abs().max()) if Y.numel() else 0.0
    for _ in range(2):
        Y = Y - Q @ (Q.T @ Y)
    if scale == 0.0:
        return Q
    U, S, _ = torch.linalg.svd(Y, full_matrices=False)
    new = U[:, S > scale * Y.shape[0] * torch.finfo(Y.dtype).eps * 10]
    return torch.cat([Q, new], 1)


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
    P, A, V = P.to(dtype), A.to(dtype), V.to(dtype)
    for name, t in (("P", P), ("A_E", A), ("V_E", V)):
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite values in {name}; refusing to rotate")
    if krylov_depth < 0 or random_rank < 0:
        raise ValueError(f"krylov_depth and random_rank must be ≥ 0, got {krylov_depth}, {random_rank}")
    Q = _orthonormal_basis(torch.cat([A, V], 1))
    if random_rank:
        rank = min(random_rank, P.shape[0])
        with torch.random.fork_rng(devices=[P.device] if P.is_cuda else []):
            torch.manual_seed(seed)          # reproducible sketch; the caller's RNG is untouched
            U_top, _, _ = torch.svd_lowrank(P, q=rank, niter=2)
        Q = _extend_basis(Q, U_top)
    block = Q
    for _ in range(krylov_depth):            # block Arnoldi on P from the basis so far
        if Q.shape[1] >= P.shape[0]:
            break
        block = _extend_basis(Q, P @ block)
        if block.shape[1] == Q.shape[1]:     # invariant subspace reached
            break
        Q, block = block, block[:, Q.shape[1]:]
    QtPQ = Q.T @ (P @ Q)
    QtA, QtV = Q.T @ A, Q.T @ V
    Mk = lam * QtPQ + QtV @ QtA.T
    Rk = newton_schulz_step(polar_svd(Mk))
    eye_k = torch.eye(Rk.shape[0], dtype=dtype, device=Rk.device)

    c = 0.0 if retention_trace is None else float(retention_trace - torch.trace(P))

    def obj(Rk_):   # λ·2·(c − tr(Rᵀ·P)) with tr(Rᵀ·P) = tr P + tr((Rk − I)ᵀ·Qᵀ·P·Q), plus the fit
        return float(lam * 2.0 * (c - ((Rk_ - eye_k) * QtPQ).sum()) + (Rk_ @ QtA - QtV).pow(2).sum())
    return SubspaceSolve(Q=Q, Rk=Rk, objective=obj(Rk), objective_identity=obj(eye_k),
                         orth_error=orthogonality_error(Rk))


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
        from .backends import choose
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
        from .backends import choose
        if choose("crosscov", P) == "triton":   # fused λ·P + V·Aᵀ in one pass over P
            from mose_fast.kernels.crosscov import crosscov
            M = crosscov(V, A, P, alpha=1.0, beta=lam)
    if M is None:
        M = cross_covariance(P, V, A, lam)
    R = polar(M)
    R = newton_schulz_step(R)   # re-orthonormalise in `dtype` before R touches any weight
    eye = torch.eye(P.shape[0], dtype=dtype, device=P.device)
    return SolveResult(R=R, objective=objective(R, P, A, V, lam, retention_trace),
                       objective_identity=objective(eye, P, A, V, lam, retention_trace),
                       orth_error=orthogonality_error(R))
