"""What the MOSE rules share: the rotation record (``Rotation``: dense, or low-rank I + U·(Rk − I)·Uᵀ,
applied in place from either side), the retention operator λ·G (+ μ·E) the solves take as products,
the polar solve (exact SVD or block Krylov, ``resolve_polar_method``), per-request edit weights, λ's
unit (``effective_lam``) and the options of method "mose" (``MOSE_OPTIONS``).

The rules: ``mose_output.py`` (the paper's W ← R·W), ``mose_input.py`` (W ← W·Q, the preset),
``mose_attn.py`` and ``mose_ffn_in.py`` (attention and FFN-input rotations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_factored_, orth_matmul_factored_right_

from ..solve.procrustes import SUBSPACE_METHODS, SolveResult, solve_rotation, solve_subspace
from .base import Option, positive

# "auto" solves exactly (a dense SVD of the d × d matrix M) up to this width and with the block-Krylov
# subspace solve above it: on the 2-core CPU the exact solve of an n = 10 edit takes 194 ms at d = 768
# against Krylov's 223, and 494 against 333 at d = 1024 (benchmarks/test_bench_solve_size.py,
# rows "mose_solve" in benchmarks/results.csv); from there the SVD's O(d³) grows away.
EXACT_SOLVE_MAX_DIM = 768


def resolve_polar_method(method: str, d: int, n: int = 1) -> str:
    """The solve "auto" means for a d-dimensional rotation and an edit of n keys: exact up to
    ``EXACT_SOLVE_MAX_DIM``, and where the Krylov basis (2n columns per block, depth + 1 blocks)
    would span the whole space anyway — it then finds the exact solution more slowly (at d = 1536,
    n = 30 and 100: 1.9–2.1 s against 1.4 s for the SVD on the 2-core CPU) — else block Krylov."""
    if method != "auto":
        return method
    krylov_basis = 2 * n * (SUBSPACE_METHODS["krylov"]["krylov_depth"] + 1)
    return "svd" if d <= EXACT_SOLVE_MAX_DIM or krylov_basis >= d else "krylov"


def _apply_dtype(W: torch.Tensor) -> torch.dtype | None:
    """The precision a rotation of W is formed in: float64 on the CPU, float32 elsewhere (None: W's own)."""
    return None if W.dtype == torch.float64 else (torch.float64 if W.device.type == "cpu" else torch.float32)


@dataclass
class Rotation:
    """An orthogonal matrix, dense (``R``) or as I + Q·(Rk − I)·Qᵀ (``Q`` d × k orthonormal,
    ``Rk`` k × k orthogonal)."""
    R: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    Rk: torch.Tensor | None = None

    def transpose(self) -> "Rotation":
        if self.R is not None:
            return Rotation(R=self.R.T.contiguous())
        return Rotation(Q=self.Q, Rk=self.Rk.T.contiguous())

    def to(self, device=None, dtype=None) -> "Rotation":
        f = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
        return Rotation(R=f(self.R), Q=f(self.Q), Rk=f(self.Rk))

    def left(self, X: torch.Tensor) -> torch.Tensor:
        """R·X, out of place, in X's dtype; O(d·k·m) in factored form (X: d × m)."""
        if self.R is not None:
            return self.R.to(X) @ X
        Q, Rk = self.Q.to(X), self.Rk.to(X)
        return X + Q @ ((Rk - torch.eye(Rk.shape[0], dtype=X.dtype, device=X.device)) @ (Q.T @ X))

    def dense(self) -> torch.Tensor:
        if self.R is not None:
            return self.R
        return self.left(torch.eye(self.Q.shape[0], dtype=self.Q.dtype, device=self.Q.device))

    def apply_left_(self, W: torch.Tensor) -> None:
        """W ← R·W in place, the product formed in float64 on the CPU and in float32 (full
        precision) elsewhere, rounded once to W's dtype; R is never rounded below float32."""
        compute = _apply_dtype(W)
        rot = self.to(W.device)
        if rot.R is not None:
            orth_matmul_(W, rot.R if compute is None else rot.R.to(compute), compute_dtype=compute)
        else:
            orth_matmul_factored_(W, rot.Q, rot.Rk, compute_dtype=compute)

    def apply_right_(self, W: torch.Tensor) -> None:
        """W ← W·R in place: factored, in row panels of W (``orth_matmul_factored_right_``); dense, as
        (W·R)ᵀ = Rᵀ·Wᵀ on the transposed view.  Products in the precision of ``apply_left_``."""
        if self.R is not None or not W.is_contiguous():
            self.transpose().apply_left_(W.T)
            return
        compute = _apply_dtype(W)
        rot = self.to(W.device)
        orth_matmul_factored_right_(W, rot.Q, rot.Rk, compute_dtype=compute)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.R, self.Q, self.Rk) if t is not None)


class RetentionOperator:
    """The retention matrix of a MOSE solve, λ·G + μ·F·Fᵀ, applied as products and never formed
    (G: d × d dense, F: d × m columns, μ = 0 or F None for no such term)."""

    def __init__(self, G: torch.Tensor, lam: float, F: torch.Tensor | None = None, mu: float = 0.0):
        self.G, self.lam, self.F, self.mu = G, float(lam), F, float(mu)
        if self.F is not None and (self.F.shape[1] == 0 or self.mu == 0.0):
            self.F = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.G.shape)

    @property
    def device(self) -> torch.device:
        return self.G.device

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        out = (self.G @ X.to(self.G.dtype)).to(X.dtype).mul_(self.lam)
        if self.F is not None:
            F = self.F.to(X)
            out.addmm_(F, F.T @ X, alpha=self.mu)
        return out

    def rows_times(self, Xt: torch.Tensor) -> torch.Tensor:
        """(P·X)ᵀ = Xᵀ·Pᵀ from the rows Xᵀ (m × d): the layout in which MKL runs narrow products fastest."""
        out = (Xt.to(self.G.dtype) @ self.G.T).to(Xt.dtype).mul_(self.lam)
        if self.F is not None:
            F = self.F.to(Xt)
            out.addmm_(Xt @ F, F.T, alpha=self.mu)
        return out

    def trace(self) -> float:
        t = self.lam * float(torch.trace(self.G))
        if self.F is not None:
            t += self.mu * float(self.F.pow(2).sum())
        return t

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        P = self.G.to(dtype) * self.lam
        if self.F is not None:
            F = self.F.to(dtype)
            P.addmm_(F, F.T, alpha=self.mu)
        return P


def solve_polar(P: RetentionOperator, A: torch.Tensor, V: torch.Tensor, polar_method: str, dtype: torch.dtype,
                retention_trace: float) -> tuple[SolveResult, Rotation]:
    """argmax tr(Rᵀ·(P + V·Aᵀ)) over rotations: dense from the exact/iterative polar methods,
    factored from the subspace ones (which apply P only as products)."""
    method = resolve_polar_method(polar_method, P.shape[0], A.shape[1])
    if method in SUBSPACE_METHODS:
        sub = solve_subspace(P, A, V, 1.0, dtype, retention_trace=retention_trace, **SUBSPACE_METHODS[method])
        return (SolveResult(R=None, objective=sub.objective, objective_identity=sub.objective_identity,
                            orth_error=sub.orth_error), Rotation(Q=sub.Q, Rk=sub.Rk))
    res = solve_rotation(P.dense(dtype), A, V, 1.0, method, dtype, retention_trace=retention_trace)
    return res, Rotation(R=res.R)


def check_edit_weights(edit_weights, n: int) -> torch.Tensor:
    """The per-request edit weights as a float64 vector: n finite values > 0, else ValueError."""
    values = edit_weights.tolist() if isinstance(edit_weights, torch.Tensor) else list(edit_weights)
    w = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if w.numel() != n or not (torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"edit_weights must be {n} finite values > 0 (one per request), got {values!r}")
    return w


def weighted(A: torch.Tensor, V: torch.Tensor, edit_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A·diag(√w), V·diag(√w)): the solvers take the edit term as V·Aᵀ, so scaling both sides'
    column j by √w_j weighs request j's term by w_j — a per-request λ/w_j, nothing else changes."""
    if edit_weights is None:
        return A, V
    root = check_edit_weights(edit_weights, A.shape[1]).to(A.device, A.dtype).sqrt()
    return A * root, V * root


def effective_lam(lam: float, unit: str, d: int) -> float:
    """λ as the solve uses it.  With ``lam_unit`` "per_dim" the configured λ is per dimension of the
    space the rotation acts in: the retention term weighs λ·tr(C)/d against an edit term of size
    ‖k‖² ≈ tr(C) (C the retention Gram), so λ/d is what carries from one model width to another."""
    return lam * d if unit == "per_dim" else lam


LAM_UNITS = ("absolute", "per_dim")

# the options of method "mose"; each side's class accepts the ones that apply to it
MOSE_OPTIONS = {
    "side": Option("output", "'output' (W ← R·W, the paper) or 'input' (W ← W·Q)", lambda x: x in ("output", "input")),
    "lam_unit": Option("absolute", "'absolute' or 'per_dim' (λ × the dimension the rotation acts in)",
                       lambda x: x in LAM_UNITS),
    "edit_memory": Option(0.0, "input side: weight μ ≥ 0 on keeping every earlier edit's keys in place",
                          lambda x: isinstance(x, (int, float)) and x >= 0 and x == x and x != float("inf")),
    "memory_cap": Option(None, "input side: cap c > 0 on the memory's weight, μ·tr(E) ≤ c·λ·tr(C0), "
                               "needs edit_memory > 0",
                         lambda x: x is None or positive(x)),
}
