"""Polar-factor methods M ↦ R = U·Vᵀ (the maximiser of tr(Rᵀ·M) over orthogonal R).

Exact (SVD, eigen route, cuSOLVER through CuPy) and matmul-only (Newton–Schulz, Polar Express)
methods; every one returns R in M's dtype, and ``solve_rotation`` re-orthonormalises it once more
before it touches a weight.

Every torch method runs its float32 products at full precision (``full_precision_matmul``), also
when called outside ``solve_rotation``: under a global TF32 setting a float32 U·Vᵀ or Newton–Schulz
step would be orthogonal only to ~1e-3, and a convergence test on a TF32 XᵀX would never pass.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..backends import full_precision_matmul


@full_precision_matmul()
def polar_svd(M: torch.Tensor) -> torch.Tensor:
    """Exact: R = U·Vᵀ from the full SVD of M."""
    U, _, Vh = torch.linalg.svd(M)
    return U @ Vh


@full_precision_matmul()
def polar_eigh(M: torch.Tensor) -> torch.Tensor:
    """Eigen route: MᵀM = Q·Σ²·Qᵀ, R = M·Q·Σ⁻¹·Qᵀ.  Squares the condition number, so it is only
    accurate when M is well conditioned (λ·P dominant and full rank); finished by one
    Newton–Schulz step to restore orthogonality lost to that squaring."""
    evals, Q = torch.linalg.eigh(M.T @ M)
    inv_sigma = evals.clamp_min(torch.finfo(M.dtype).tiny).rsqrt()
    R = (M @ Q) * inv_sigma
    return newton_schulz_step(R @ Q.T)


@full_precision_matmul()
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


@full_precision_matmul()
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


@full_precision_matmul()
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


@full_precision_matmul()
def polar_express_fp32(M: torch.Tensor) -> torch.Tensor:
    """Polar Express in float32, finished by two Newton–Schulz steps in M's dtype."""
    X = polar_express(M.to(torch.float32), steps=40, tol=1e-5).to(M.dtype)
    return newton_schulz_step(newton_schulz_step(X))


@full_precision_matmul()
def newton_schulz_step(R: torch.Tensor, eye: torch.Tensor | None = None) -> torch.Tensor:
    """One step towards the nearest orthogonal matrix; squares a small ‖RᵀR − I‖."""
    if eye is None:
        eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return R @ (1.5 * eye - 0.5 * (R.T @ R))


# cuSOLVER SVD drivers through CuPy, and what each returns as its third factor: cupy.linalg.svd
# (cusolverDn<t>gesvd) returns (u, s, vh) with a = u·diag(s)·vh, like numpy; cupyx.cusolver.gesvdj
# returns (u, s, v) with a = u·diag(s)·vᴴ.
CUSOLVER_DRIVERS = {"gesvd": "vh", "gesvdj": "v"}


def polar_from_cusolver(a, driver: str = "gesvd"):
    """R = U·Vᴴ of a square array ``a`` (a CuPy array on the GPU) from the cuSOLVER driver named,
    with the third factor read by that driver's convention.  Imports CuPy when called."""
    if driver not in CUSOLVER_DRIVERS:
        raise ValueError(f"unknown cuSOLVER driver {driver!r}; choose from {sorted(CUSOLVER_DRIVERS)}")
    if driver == "gesvdj":
        from cupyx.cusolver import gesvdj
        u, _, third = gesvdj(a, full_matrices=True, overwrite_a=False)
    else:
        import cupy
        u, _, third = cupy.linalg.svd(a, full_matrices=True)
    vh = third.conj().T if CUSOLVER_DRIVERS[driver] == "v" else third
    return u @ vh


def polar_cupy(M: torch.Tensor, driver: str = "gesvd") -> torch.Tensor:
    """cuSOLVER through CuPy, zero-copy via DLPack: ``gesvd`` (QR-based) or ``gesvdj`` (Jacobi).
    CUDA tensors only; CuPy is the [gpu] extra."""
    if not M.is_cuda:
        raise ValueError("the cupy polar methods need a CUDA tensor")
    import cupy

    from ..backends import device_guard
    # on M's GPU, for torch (its current stream, which the DLPack exchange synchronises with) and
    # for CuPy (whose cuSOLVER handle and allocations follow its own current device)
    with device_guard(M), cupy.cuda.Device(M.device.index if M.device.index is not None
                                           else torch.cuda.current_device()):
        return torch.from_dlpack(polar_from_cusolver(cupy.from_dlpack(M.contiguous()), driver))


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
