"""AlphaEdit (Fang et al. 2025): project the update onto the null space of the preserved keys.

P = Û·Ûᵀ with Û the eigenvectors of C0 whose eigenvalue is below ``threshold`` × the largest
(relative, so it does not depend on how C0 is normalised; AlphaEdit's code compares the raw sum
with an absolute 1e-2).  With the cumulative Gram C_p = Σ K_p·K_pᵀ of earlier edits,

    Δᵀ = (P·(K·Kᵀ + C_p) + L2·I)⁻¹ · P·K·residᵀ

so Δ = Δ·P: keys in the dominant subspace of C0 (P·k0 = 0) map exactly as before."""
from __future__ import annotations

import torch

from .base import AdditiveRule, Option, layer_tensors, non_negative, positive


def null_space_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(C0)
    small = evecs[:, evals < threshold * evals.max()]
    return small @ small.T


def alphaedit_delta(P: torch.Tensor, C_p: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
                    l2: float) -> torch.Tensor:
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    upd = torch.linalg.solve(P @ (K @ K.T + C_p) + l2 * eye, P @ K @ resid.T)   # d_in × d_out
    return upd.T


class AlphaEditRule(AdditiveRule):
    name = "alphaedit"
    OPTIONS = {"threshold": Option(1e-2, "null-space threshold relative to C0's largest eigenvalue, > 0", positive),
               "l2": Option(10.0, "ridge on the update, ≥ 0", non_negative)}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        self.threshold, self.l2 = self.hparams["threshold"], self.hparams["l2"]
        self.P: dict[int, torch.Tensor] = {}
        self.C_p: dict[int, torch.Tensor] = {}

    @classmethod
    def planned_state(cls, d_out, d_in, kept_keys, hparams):
        return {**super().planned_state(d_out, d_in, kept_keys, hparams),
                "null-space projector (float64)": 8 * d_in * d_in, "C_p (float64)": 8 * d_in * d_in}

    def prepare(self, layer, W, C0):
        super().prepare(layer, W, C0)
        if layer not in self.P:
            self.P[layer] = null_space_projector(self.C0[layer], self.threshold)
        if layer not in self.C_p:
            self.C_p[layer] = torch.zeros_like(self.C0[layer])
        else:
            self.C_p[layer] = self.C_p[layer].to(self.C0[layer])

    def delta(self, layer, W, K, resid):
        return alphaedit_delta(self.P[layer], self.C_p[layer], K, resid, self.l2)

    def commit(self, layer, record):
        K = record.keys.to(self.C_p[layer])
        self.C_p[layer] += K @ K.T

    def undo(self, layer, record):
        K = record.keys.to(self.C_p[layer])
        self.C_p[layer] -= K @ K.T

    def state_dict(self):
        return {f"C_p.{l}": c for l, c in self.C_p.items()}

    def load_state_dict(self, state):
        self.C_p = layer_tensors(state, "C_p")
