"""AlphaEdit (Fang et al. 2025): project the update onto the null space of the preserved keys.

P = Û·Ûᵀ with Û the eigenvectors of C0 whose eigenvalue is below ``threshold`` × the largest
(relative, so it does not depend on how C0 is normalised; AlphaEdit's code compares the raw sum
with an absolute 1e-2).  With the cumulative Gram C_p = Σ K_p·K_pᵀ of earlier edits,

    Δᵀ = (P·(K·Kᵀ + C_p) + L2·I)⁻¹ · P·K·residᵀ

so Δ = Δ·P: keys in the dominant subspace of C0 (P·k0 = 0) map exactly as before."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AdditiveRule, UpdateResult


@dataclass
class AlphaEditUndo:
    delta: torch.Tensor                 # Δ, taken back by W ← W − Δ
    keys: torch.Tensor | None = None    # keys this edit adds to C_p (its last pass), taken back too


def null_space_projector(C0: torch.Tensor, threshold: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(C0)
    small = evecs[:, evals < threshold * evals.max()]
    return small @ small.T


def alphaedit_delta(P: torch.Tensor, C_p: torch.Tensor, K: torch.Tensor, resid: torch.Tensor, l2: float) -> torch.Tensor:
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    upd = torch.linalg.solve(P @ (K @ K.T + C_p) + l2 * eye, P @ K @ resid.T)   # d_in × d_out
    return upd.T


class AlphaEditRule(AdditiveRule):
    name = "alphaedit"

    def __init__(self, threshold: float = 1e-2, l2: float = 10.0):
        super().__init__(threshold=threshold, l2=l2)
        self.threshold, self.l2 = threshold, l2
        self.P: dict[int, torch.Tensor] = {}
        self.C_p: dict[int, torch.Tensor] = {}

    def prepare(self, layer, W, C0):
        super().prepare(layer, W, C0)
        if layer not in self.P:
            self.P[layer] = null_space_projector(self.C0[layer], self.threshold)
            self.C_p[layer] = torch.zeros_like(self.C0[layer])

    def delta(self, layer, W, K, resid):
        return alphaedit_delta(self.P[layer], self.C_p[layer], K, resid, self.l2)

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               remember: bool = True) -> UpdateResult:
        """Δ as every additive rule; the undo also carries the keys ``after_edit`` will add to C_p
        (the editor calls it once per edit, after the pass with ``remember``), so that undoing an
        edit frees its keys and later edits are not held to it."""
        res = super().update(layer, W, K, resid, remember)
        res.undo = AlphaEditUndo(res.undo, K.detach().to("cpu", torch.float64).clone() if remember else None)
        return res

    def after_edit(self, layer, K):
        self.C_p[layer] += K.to(self.C_p[layer]) @ K.to(self.C_p[layer]).T

    def revert(self, layer: int, W: torch.Tensor, undo: AlphaEditUndo) -> None:
        super().revert(layer, W, undo.delta)
        if undo.keys is not None:
            K = undo.keys.to(self.C_p[layer])
            self.C_p[layer] -= K @ K.T

    def snapshot(self):
        return {l: c.clone() for l, c in self.C_p.items()}

    def restore(self, snap):
        self.C_p = snap
