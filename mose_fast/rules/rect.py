"""RECT (Gu et al. 2024): MEMIT's update, keeping only the entries with the largest relative
change |Δ_ij| / |W_ij| (the top ``keep_ratio`` fraction); the rest are zeroed."""
from __future__ import annotations

import torch

from .memit import MEMITRule


def rect_sparsify(D: torch.Tensor, W: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    rel = D.abs() / W.abs().clamp_min(torch.finfo(W.dtype).tiny)
    k = max(1, int(round(keep_ratio * D.numel())))
    cut = rel.reshape(-1).kthvalue(D.numel() - k + 1).values
    return torch.where(rel >= cut, D, torch.zeros_like(D))


class RECTRule(MEMITRule):
    name = "rect"

    def __init__(self, mom2_update_weight: float = 15000.0, keep_ratio: float = 0.2):
        super().__init__(mom2_update_weight)
        self.hparams["keep_ratio"] = keep_ratio
        self.keep_ratio = keep_ratio

    def delta(self, layer, W, K, resid):
        return rect_sparsify(super().delta(layer, W, K, resid), W, self.keep_ratio)
