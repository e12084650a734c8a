"""MEMIT (Meng et al. 2023): Δ = resid·Kᵀ·(λ·C0 + K·Kᵀ)⁻¹, λ = mom2_update_weight.

C0 here is the mean second moment E[k kᵀ], as MEMIT's ``get_cov`` returns it, so λ keeps MEMIT's
meaning (15000 in its GPT-J/Llama settings)."""
from __future__ import annotations

import torch

from .base import AdditiveRule, Option, positive


def memit_delta(C0: torch.Tensor, K: torch.Tensor, resid: torch.Tensor, lam: float) -> torch.Tensor:
    adj = torch.linalg.solve(lam * C0 + K @ K.T, K)     # (λ·C0 + K·Kᵀ)⁻¹·K, d_in × n
    return resid @ adj.T


class MEMITRule(AdditiveRule):
    name = "memit"
    OPTIONS = {"mom2_update_weight": Option(15000.0, "λ on C0 in (λ·C0 + K·Kᵀ)⁻¹, > 0", positive)}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.lam = self.hparams["mom2_update_weight"]

    def delta(self, layer, W, K, resid):
        return memit_delta(self.C0[layer], K, resid, self.lam)
