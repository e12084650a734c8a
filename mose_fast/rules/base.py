"""What every update rule shares: the editor hands it, per layer, the keys K_E (d_in × n) and the
residual to add at the layer's output (d_out × n); the rule changes W in place and returns what
undo needs.  Only ``update`` differs between MOSE and the additive baselines."""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class UpdateResult:
    objective: float            # the rule's own objective after the update (MOSE: Procrustes)
    objective_identity: float   # ... with no update
    orth_error: float           # ‖RᵀR − I‖_F for rotations; nan for additive rules
    undo: Any                   # what revert() needs
    seconds_solve: float
    seconds_apply: float


class AdditiveRule(abc.ABC):
    """Base of the additive editors: W ← W + Δ, undone by W ← W − Δ (Δ kept in factored form
    where the rule allows).  Subclasses implement ``delta``."""
    name = "additive"

    def __init__(self, **hparams):
        self.hparams = hparams
        self.C0: dict[int, torch.Tensor] = {}
        self.W0: dict[int, torch.Tensor] = {}

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        if layer not in self.C0:
            self.C0[layer] = C0.to(device=W.device, dtype=torch.float64)
            self.W0[layer] = W.detach().to(torch.float64).clone()

    @abc.abstractmethod
    def delta(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """The additive update Δ (d_out × d_in, float64) for keys K and residual resid."""

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               remember: bool = True) -> UpdateResult:
        """W ← W + Δ.  ``remember`` is part of every rule's signature; the additive rules keep
        their memory of edits (AlphaEdit's K_p) in ``after_edit`` instead."""
        t = time.perf_counter()
        Wd = W.to(torch.float64)
        K, resid = K.to(Wd), resid.to(Wd)
        target = Wd @ K + resid
        D = self.delta(layer, Wd, K, resid)
        if not torch.isfinite(D).all():
            raise ValueError(f"{self.name}: non-finite update at layer {layer}; refusing to apply")
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            W.copy_((Wd + D).to(W.dtype))
        t_apply = time.perf_counter() - t
        fit = float(((Wd + D) @ K - target).pow(2).sum())
        return UpdateResult(objective=fit, objective_identity=float(resid.pow(2).sum()), orth_error=float("nan"),
                            undo=D.to("cpu", torch.float32), seconds_solve=t_solve, seconds_apply=t_apply)

    def revert(self, layer: int, W: torch.Tensor, undo: torch.Tensor) -> None:
        with torch.no_grad():
            W.copy_((W.to(torch.float64) - undo.to(W.device, torch.float64)).to(W.dtype))

    # Rules with state beyond W (AlphaEdit's cumulative keys) override these three; the
    # defaults say "no such state".
    def after_edit(self, layer: int, K: torch.Tensor) -> None:
        """Record an applied edit's keys (nothing to record by default)."""

    def snapshot(self) -> dict:
        return {}

    def restore(self, snap: dict) -> None:
        """Put back state from snapshot() (none by default)."""
