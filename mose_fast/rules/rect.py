"""RECT (Gu et al. 2024): MEMIT's update, keeping only the entries with the largest relative
change |Δ_ij| / |W_ij| (the top ``keep_ratio`` fraction); the rest are zeroed."""
from __future__ import annotations

import torch

from .base import Option
from .memit import MEMITRule


def rect_sparsify(D: torch.Tensor, W: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    rel = D.abs() / W.abs().clamp_min(torch.finfo(W.dtype).tiny)
    k = max(1, int(round(keep_ratio * D.numel())))
    cut = rel.reshape(-1).kthvalue(D.numel() - k + 1).values
    return torch.where(rel >= cut, D, torch.zeros_like(D))


class RECTRule(MEMITRule):
    name = "rect"
    OPTIONS = {**MEMITRule.OPTIONS,
               "keep_ratio": Option(0.2, "share of Δ's entries kept, in (0, 1]",
                                    lambda x: isinstance(x, (int, float)) and 0 < x <= 1)}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.keep_ratio = self.hparams["keep_ratio"]

    def delta(self, layer, W, K, resid):
        return rect_sparsify(super().delta(layer, W, K, resid), W, self.keep_ratio)
