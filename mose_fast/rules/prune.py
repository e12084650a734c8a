"""PRUNE (Ma et al. 2025): bound the singular values of the *accumulated* update W − W0.

After MEMIT's step, with W − W0 = U·Σ·Vᵀ, every σ_i above σ_max(W0) is replaced by
σ_max(W0) + ln(σ_i / σ_max(W0)) (continuous at σ_max(W0), growing only logarithmically), and
the returned Δ is what takes W to W0 + U·Σ̂·Vᵀ."""
from __future__ import annotations

import torch

from .memit import MEMITRule


def prune_restrain(total: torch.Tensor, sigma_max_w0: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    big = S > sigma_max_w0
    S_hat = torch.where(big, sigma_max_w0 + torch.log(S / sigma_max_w0), S)
    return (U * S_hat) @ Vh


class PRUNERule(MEMITRule):
    name = "prune"

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.sigma_max: dict[int, float] = {}

    def prepare(self, layer, W, C0):
        super().prepare(layer, W, C0)
        self.sigma_max.setdefault(layer, float(torch.linalg.matrix_norm(self.W0[layer], ord=2)))

    def delta(self, layer, W, K, resid):
        total = (W - self.W0[layer]) + super().delta(layer, W, K, resid)
        return self.W0[layer] + prune_restrain(total, self.sigma_max[layer]) - W
