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


def objective(R: torch.Tensor, P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float) -> float:
    """λ‖(R − I)·W·K0‖² (mean over corpus tokens) + ‖R·A − V‖², for orthogonal R."""
    retention = 2.0 * (torch.trace(P) - torch.trace(R @ P))
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
}
# Methods that never form the d_out × d_out M (see solve_subspace).
SUBSPACE_METHODS = ("subspace",)


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


def solve_subspace(P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float,
                   dtype: torch.dtype = torch.float64) -> SubspaceSolve:
    """The optimum over rotations that act only on S = span[A_E, V_E] (identity on S⊥).

    With R = I − Q·Qᵀ + Q·Rk·Qᵀ,  tr(Rᵀ·M) = const + tr(Rkᵀ·Qᵀ·M·Q),  so Rk is the polar factor of
    the k × k matrix  Qᵀ·M·Q = λ·(Qᵀ·P·Q) + (Qᵀ·V)(Qᵀ·A)ᵀ  (k ≤ 2n).  Cost O(d_out²·k) for P·Q
    instead of O(d_out³); the apply is the factored W ← W + Q·((Rk − I)·(Qᵀ·W)).  It is exact for
    the edit term (A, V lie in S) and an approximation of the full optimum for the retention term,
    whose exact rotation also turns directions outside S.
    """
    P, A, V = P.to(dtype), A.to(dtype), V.to(dtype)
    for name, t in (("P", P), ("A_E", A), ("V_E", V)):
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite values in {name}; refusing to rotate")
    U, S, _ = torch.linalg.svd(torch.cat([A, V], 1), full_matrices=False)
    keep = S > S[0] * A.shape[0] * torch.finfo(dtype).eps if S.numel() and S[0] > 0 else S > 0
    Q = U[:, keep]
    PQ = P @ Q
    QtA, QtV = Q.T @ A, Q.T @ V
    Mk = lam * (Q.T @ PQ) + QtV @ QtA.T
    Rk = newton_schulz_step(polar_svd(Mk))
    eye_k = torch.eye(Rk.shape[0], dtype=dtype, device=Rk.device)
    QtPQ = Q.T @ PQ

    def obj(Rk_):
        retention = 2.0 * (torch.trace(P) - (torch.trace(P) + torch.trace((Rk_ - eye_k) @ QtPQ)))
        return float(lam * retention + (Rk_ @ QtA - QtV).pow(2).sum())
    return SubspaceSolve(Q=Q, Rk=Rk, objective=obj(Rk), objective_identity=obj(eye_k),
                         orth_error=orthogonality_error(Rk))


def solve_rotation(P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float,
                   method: str = "svd", dtype: torch.dtype = torch.float64) -> SolveResult:
    """The MOSE rotation for one layer.

    P: (d_out × d_out) retention Gram W·C0·Wᵀ;  A, V: (d_out × n) current outputs W·K_E and
    target values.  Computed in ``dtype`` (float64 by default) and re-orthonormalised there,
    so R is orthogonal to ~1e-15 whatever the method's own accuracy.
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
    return SolveResult(R=R, objective=objective(R, P, A, V, lam), objective_identity=objective(eye, P, A, V, lam),
                       orth_error=orthogonality_error(R))
