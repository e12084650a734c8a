"""MOSE, the paper's rule: W ← R·W with R the closed-form Procrustes rotation of the output space.

    R = polar(M),   M = λ·P + V_E·A_Eᵀ,   P = W·C0·Wᵀ,   A_E = W·K_E,   V_E = A_E + resid

``P`` (d_out × d_out, float64) is built once per layer and follows every kept edit as
P ← R·P·Rᵀ — the same matrix as recomputing W·C0·Wᵀ from the current weights, without touching
anything of size d_in × d_in after the first edit.

The rotation record, the retention operator and the solve are shared with the other MOSE rules
(``rotation.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import Rule, UpdateResult, layer_tensors
from .rotation import MOSE_OPTIONS, RetentionOperator, Rotation, effective_lam, solve_polar, weighted


@dataclass
class OutputRecord:
    rotation: Rotation          # on the host


class MOSERule(Rule):
    """The paper's rule (``rule_hparams: {"side": "output"}``): keep the current model's outputs on
    the corpus keys, λ‖R·W·K0 − W·K0‖², and move the edit keys' outputs to their targets."""
    name = "mose"
    OPTIONS = MOSE_OPTIONS
    supports_edit_weights = True

    def __init__(self, lam: float, polar_method: str = "auto", solve_dtype: torch.dtype = torch.float64, **hparams):
        opts = self.check_options(hparams)
        if opts["side"] != "output":
            raise ValueError(f"MOSERule rotates the output side; got side={opts['side']!r} (see MOSEInputRule)")
        if opts["edit_memory"] or opts["memory_cap"] is not None:
            raise ValueError("rule_hparams.edit_memory / memory_cap are input-side options (side: 'input')")
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"MOSE λ must be ≥ 0, got {lam!r}")
        self.lam, self.lam_unit = float(lam), opts["lam_unit"]
        self.polar_method, self.solve_dtype = polar_method, solve_dtype
        self.gram: dict[int, torch.Tensor] = {}      # P = W·C0·Wᵀ, float64

    @classmethod
    def planned_state(cls, d_out, d_in, kept_keys, hparams):
        return {"retention Gram P (float64)": 8 * d_out * d_out}

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        if layer in self.gram:
            self.gram[layer] = self.gram[layer].to(W.device, torch.float64)
            return
        Wd = W.to(torch.float64)
        P = Wd @ C0.to(device=W.device, dtype=torch.float64) @ Wd.T
        self.gram[layer] = 0.5 * (P + P.T)

    def lam_for(self, layer: int) -> float:
        return effective_lam(self.lam, self.lam_unit, self.gram[layer].shape[0])

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> UpdateResult:
        t = time.perf_counter()
        A = W.to(torch.float64) @ K.to(W.device, torch.float64)           # d_out × n
        V = A + resid.to(W.device, torch.float64)
        for name, x in (("keys", A), ("residual", V)):
            if not torch.isfinite(x).all():
                raise ValueError(f"non-finite {name} at layer {layer}; refusing to rotate")
        A, V = weighted(A, V, edit_weights)
        lam = self.lam_for(layer)
        P = RetentionOperator(self.gram[layer], lam)
        solved, rot = solve_polar(P, A, V, self.polar_method, self.solve_dtype, P.trace())
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            rot.apply_left_(W)
        if W.is_cuda:
            torch.cuda.synchronize(W.device)
        return UpdateResult(objective=solved.objective, objective_identity=solved.objective_identity,
                            orth_error=solved.orth_error, undo=OutputRecord(rot.to("cpu")),
                            seconds_solve=t_solve, seconds_apply=time.perf_counter() - t)

    def _rotate_gram(self, layer: int, rot: Rotation) -> None:
        P = self.gram[layer]
        with torch.no_grad():
            rot.apply_left_(P)
            rot.transpose().apply_right_(P)      # R·P·Rᵀ, in place (apply_right_ multiplies by R)
        self.gram[layer] = 0.5 * (P + P.T)

    def commit(self, layer: int, record: OutputRecord) -> None:
        self._rotate_gram(layer, record.rotation)

    def undo(self, layer: int, record: OutputRecord) -> None:
        self._rotate_gram(layer, record.rotation.transpose())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"P.{l}": p for l, p in self.gram.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith("P.")]
        if unknown:
            raise ValueError(f"not a MOSE output-side state: {unknown}")
        self.gram = layer_tensors(state, "P")
