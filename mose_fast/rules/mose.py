"""MOSE's update rule: W ← R·W with R the closed-form Procrustes rotation.

The rule keeps, per layer, the retention Gram ``P = W·C0·Wᵀ`` (d_out × d_out, float64).  It is
built once from C0 and afterwards updated exactly as ``P ← R·P·Rᵀ`` (since W' = R·W), so no
d_in × d_in matrix is touched after the first edit of a layer and C0 can be dropped.

A rotation is dense (``R``, from the full solve) or factored (``Q, Rk`` with
R = I + Q·(Rk − I)·Qᵀ, from the subspace solve); both apply in place and both undo exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_factored_
from ..procrustes import SUBSPACE_METHODS, SolveResult, solve_rotation, solve_subspace
from .base import UpdateResult


@dataclass
class Rotation:
    R: torch.Tensor | None = None     # dense d_out × d_out
    Q: torch.Tensor | None = None     # factored: d_out × k orthonormal
    Rk: torch.Tensor | None = None    # factored: k × k orthogonal

    def transpose(self) -> "Rotation":
        if self.R is not None:
            return Rotation(R=self.R.T.contiguous())
        return Rotation(Q=self.Q, Rk=self.Rk.T.contiguous())

    def to(self, device) -> "Rotation":
        f = (lambda t: None if t is None else t.to(device))
        return Rotation(R=f(self.R), Q=f(self.Q), Rk=f(self.Rk))

    def apply_(self, W: torch.Tensor, compute_dtype: torch.dtype | None) -> None:
        if self.R is not None:
            orth_matmul_(W, self.R, compute_dtype=compute_dtype)
        else:
            orth_matmul_factored_(W, self.Q, self.Rk, compute_dtype=compute_dtype)

    def rotate_gram(self, P: torch.Tensor) -> torch.Tensor:
        """R·P·Rᵀ, symmetrised; O(d²·k) in factored form."""
        if self.R is not None:
            P = self.R @ P @ self.R.T
        else:
            D = self.Rk - torch.eye(self.Rk.shape[0], dtype=self.Rk.dtype, device=self.Rk.device)
            RP = P + self.Q @ (D @ (self.Q.T @ P))
            P = RP + ((RP @ self.Q) @ D.T) @ self.Q.T
        return 0.5 * (P + P.T)


class MOSERule:
    name = "mose"

    def __init__(self, lam: float, polar_method: str = "svd", solve_dtype: torch.dtype = torch.float64):
        self.lam = lam
        self.polar_method = polar_method
        self.solve_dtype = solve_dtype
        self.gram: dict[int, torch.Tensor] = {}

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        """Build P = W·C0·Wᵀ for a layer (once)."""
        if layer not in self.gram:
            Wd = W.to(self.solve_dtype)
            P = Wd @ C0.to(device=W.device, dtype=self.solve_dtype) @ Wd.T
            self.gram[layer] = 0.5 * (P + P.T)

    def solve(self, layer: int, A: torch.Tensor, V: torch.Tensor) -> tuple[SolveResult, Rotation, float]:
        t = time.perf_counter()
        if self.polar_method in SUBSPACE_METHODS:
            sub = solve_subspace(self.gram[layer], A, V, self.lam, self.solve_dtype)
            res = SolveResult(R=None, objective=sub.objective, objective_identity=sub.objective_identity,
                              orth_error=sub.orth_error)
            rot = Rotation(Q=sub.Q, Rk=sub.Rk)
        else:
            res = solve_rotation(self.gram[layer], A, V, self.lam, self.polar_method, self.solve_dtype)
            rot = Rotation(R=res.R)
        return res, rot, time.perf_counter() - t

    def apply(self, layer: int, W: torch.Tensor, rot: Rotation) -> float:
        """W ← R·W in place (through the backend); P ← R·P·Rᵀ.  Returns seconds."""
        t = time.perf_counter()
        # A float64 product costs little at CPU sizes and removes one rounding per edit; on the
        # GPU the float32 kernel is used with R already orthonormal in float64.
        compute = torch.float64 if W.device.type == "cpu" else torch.float32
        rot = rot.to(W.device)
        rot.apply_(W, compute if W.dtype != torch.float64 else None)
        self.gram[layer] = rot.rotate_gram(self.gram[layer])
        if W.is_cuda:
            torch.cuda.synchronize(W.device)
        return time.perf_counter() - t

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor) -> UpdateResult:
        """The editor's entry: A_E = W·K_E, V_E = A_E + resid; solve, rotate W in place."""
        A = W.to(self.solve_dtype) @ K.to(W.device, self.solve_dtype)          # d_out × n
        V = A + resid.to(W.device, self.solve_dtype)
        solved, rot, t_solve = self.solve(layer, A, V)
        t_apply = self.apply(layer, W, rot)
        return UpdateResult(objective=solved.objective, objective_identity=solved.objective_identity,
                            orth_error=solved.orth_error, undo=rot.to("cpu"), seconds_solve=t_solve,
                            seconds_apply=t_apply)

    def revert(self, layer: int, W: torch.Tensor, rot: Rotation) -> None:
        """Undo a rotation: W ← Rᵀ·W, P ← Rᵀ·P·R."""
        self.apply(layer, W, rot.transpose())

    def after_edit(self, layer: int, K: torch.Tensor) -> None:
        """MOSE keeps no record of past keys: the Gram P already carries all retention state."""

    def snapshot(self) -> dict:
        return {l: p.clone() for l, p in self.gram.items()}

    def restore(self, snap: dict) -> None:
        self.gram = snap
