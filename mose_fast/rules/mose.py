"""MOSE's update rule: W ← R·W with R the closed-form Procrustes rotation.

The rule keeps, per layer, the retention Gram ``P = W·C0·Wᵀ`` (d_out × d_out, float64).  It is
built once from C0 and afterwards updated exactly as ``P ← R·P·Rᵀ`` (since W' = R·W), so no
d_in × d_in matrix is touched after the first edit of a layer and C0 can be dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mose_fast.kernels.orth_matmul import orth_matmul_
from ..procrustes import SolveResult, solve_rotation


@dataclass
class RotationStep:
    R: torch.Tensor
    solve: SolveResult
    seconds_solve: float
    seconds_apply: float


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

    def solve(self, layer: int, A: torch.Tensor, V: torch.Tensor) -> tuple[SolveResult, float]:
        t = time.perf_counter()
        res = solve_rotation(self.gram[layer], A, V, self.lam, self.polar_method, self.solve_dtype)
        return res, time.perf_counter() - t

    def apply(self, layer: int, W: torch.Tensor, R: torch.Tensor) -> float:
        """W ← R·W in place (through the backend); P ← R·P·Rᵀ.  Returns seconds."""
        t = time.perf_counter()
        # A float64 product costs nothing at CPU sizes and removes one rounding per edit; on the
        # GPU the float32 kernel is used with R already orthonormal in float64.
        compute = torch.float64 if W.device.type == "cpu" else torch.float32
        orth_matmul_(W, R.to(W.device), compute_dtype=compute if W.dtype != torch.float64 else None)
        P = R @ self.gram[layer] @ R.T
        self.gram[layer] = 0.5 * (P + P.T)
        if W.is_cuda:
            torch.cuda.synchronize(W.device)
        return time.perf_counter() - t

    def revert(self, layer: int, W: torch.Tensor, R: torch.Tensor) -> None:
        """Undo a rotation: W ← Rᵀ·W, P ← Rᵀ·P·R."""
        self.apply(layer, W, R.T.contiguous())
