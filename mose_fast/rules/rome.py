"""ROME (Meng et al. 2022): one layer, rank one.  With u = C0⁻¹·k, the update
Δ = (v − W·k)·uᵀ / (uᵀ·k) makes W'·k = v exactly while changing W only along C0⁻¹·k, the
direction that disturbs the statistics' keys least.  Several requests are applied one by one."""
from __future__ import annotations

import torch

from .base import AdditiveRule


def rome_delta(C0: torch.Tensor, k: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """k: (d_in,), r = v − W·k: (d_out,)."""
    u = torch.linalg.solve(C0, k)
    return torch.outer(r, u) / (u @ k)


class ROMERule(AdditiveRule):
    name = "rome"

    def delta(self, layer, W, K, resid):
        D = torch.zeros_like(W)
        for j in range(K.shape[1]):
            k = K[:, j]
            r = (W @ k + resid[:, j]) - (W + D) @ k      # remaining error after the earlier requests
            D = D + rome_delta(self.C0[layer], k, r)
        return D
