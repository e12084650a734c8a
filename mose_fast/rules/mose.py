"""MOSE's update rule: W ← R·W with R the closed-form Procrustes rotation.

The rule keeps, per layer, the retention Gram ``P = W·C0·Wᵀ`` (d_out × d_out, float64).  It is
built once from C0 and afterwards updated exactly as ``P ← R·P·Rᵀ`` (since W' = R·W), so no
d_in × d_in matrix is touched after the first edit of a layer and C0 can be dropped.

A rotation is dense (``R``, from the full solve) or factored (``Q, Rk`` with
R = I + Q·(Rk − I)·Qᵀ, from the subspace solve); both apply in place and both undo exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_factored_
from ..solve.procrustes import SUBSPACE_METHODS, SolveResult, solve_rotation, solve_subspace
from .base import UpdateResult


@dataclass
class Rotation:
    R: torch.Tensor | None = None     # dense d_out × d_out
    Q: torch.Tensor | None = None     # factored: d_out × k orthonormal
    Rk: torch.Tensor | None = None    # factored: k × k orthogonal
    memory_added: torch.Tensor | None = None   # d_out × n outputs this edit added to the edit memory

    def transpose(self) -> "Rotation":
        if self.R is not None:
            return Rotation(R=self.R.T.contiguous())
        return Rotation(Q=self.Q, Rk=self.Rk.T.contiguous())

    def to(self, device) -> "Rotation":
        f = (lambda t: None if t is None else t.to(device))
        return Rotation(R=f(self.R), Q=f(self.Q), Rk=f(self.Rk), memory_added=f(self.memory_added))

    def left(self, X: torch.Tensor) -> torch.Tensor:
        """R·X, out of place; O(d·k·m) in factored form (X: d × m).  The other products derive
        from it: G·Rᵀ = (R·Gᵀ)ᵀ, R·P·Rᵀ = (R·(R·P)ᵀ)ᵀ."""
        if self.R is not None:
            return self.R.to(X) @ X
        Q, Rk = self.Q.to(X), self.Rk.to(X)
        return X + Q @ ((Rk - torch.eye(Rk.shape[0], dtype=X.dtype, device=X.device)) @ (Q.T @ X))

    def rotate_right(self, G: torch.Tensor) -> torch.Tensor:
        """G·Rᵀ (the cross Gram W0·C0·Wᵀ after W ← R·W)."""
        return self.left(G.T).T

    def apply_(self, W: torch.Tensor, compute_dtype: torch.dtype | None) -> None:
        if self.R is not None:
            orth_matmul_(W, self.R, compute_dtype=compute_dtype)
        else:
            orth_matmul_factored_(W, self.Q, self.Rk, compute_dtype=compute_dtype)

    def rotate_gram(self, P: torch.Tensor) -> torch.Tensor:
        """R·P·Rᵀ, symmetrised; O(d²·k) in factored form."""
        P = self.left(self.left(P).T).T
        return 0.5 * (P + P.T)


def check_options(lam: float, retain: str, edit_memory: float) -> None:
    """The options both sides share (``MOSERule``, ``MOSEInputRule``)."""
    if retain not in ("current", "original"):
        raise ValueError(f"MOSE retain={retain!r}: choose 'current' (the paper) or 'original'")
    if not edit_memory >= 0.0:
        raise ValueError(f"MOSE edit_memory must be ≥ 0, got {edit_memory}")
    if not lam >= 0.0:
        raise ValueError(f"MOSE λ must be ≥ 0, got {lam}")


def solve_polar(P: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float, polar_method: str,
                dtype: torch.dtype, retention_trace: float | None) -> tuple[SolveResult, Rotation]:
    """argmax tr(Rᵀ·(λ·P + V·Aᵀ)) over rotations: dense from the exact/iterative polar methods,
    factored from the subspace ones."""
    if polar_method in SUBSPACE_METHODS:
        sub = solve_subspace(P, A, V, lam, dtype, retention_trace=retention_trace,
                             **SUBSPACE_METHODS[polar_method])
        return (SolveResult(R=None, objective=sub.objective, objective_identity=sub.objective_identity,
                            orth_error=sub.orth_error), Rotation(Q=sub.Q, Rk=sub.Rk))
    res = solve_rotation(P, A, V, lam, polar_method, dtype, retention_trace=retention_trace)
    return res, Rotation(R=res.R)


def check_edit_weights(edit_weights, n: int) -> torch.Tensor:
    """The per-request edit weights as a float64 vector: n finite values > 0, else ValueError."""
    values = edit_weights.tolist() if isinstance(edit_weights, torch.Tensor) else list(edit_weights)
    w = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if w.numel() != n or not (torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"edit_weights must be {n} finite values > 0 (one per request), got {values!r}")
    return w


def weighted(A: torch.Tensor, V: torch.Tensor, edit_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A·diag(√w), V·diag(√w)): the solvers take the edit term as V·Aᵀ, so scaling both sides'
    column j by √w_j weighs request j's term by w_j — a per-request λ/w_j, nothing else changes."""
    if edit_weights is None:
        return A, V
    root = check_edit_weights(edit_weights, A.shape[1]).to(A.device, A.dtype).sqrt()
    return A * root, V * root


def forget_edit(memory: dict[int, torch.Tensor], layer: int, rot: Rotation) -> None:
    """Take an undone edit's vectors back out of the edit memory (before rotating back)."""
    if rot.memory_added is not None and layer in memory:
        m = rot.memory_added.to(memory[layer])
        memory[layer] = memory[layer] - m @ m.T


class MOSERule:
    """The MOSE rule, with three options studied in issue 4 (all off by default = the paper):

    * ``retain``: "current" keeps W·K0 of the model as it is now (the paper's λ‖R·W·K0 − W·K0‖²;
      retention Gram P = W·C0·Wᵀ, updated P ← R·P·Rᵀ); "original" keeps the unedited model's
      outputs, λ‖R·W·K0 − W0·K0‖², so drift on general text does not compound over edits
      (cross Gram G = W0·C0·Wᵀ, updated G ← G·Rᵀ; M = λ·G + V·Aᵀ is still a Procrustes problem).
    * ``edit_memory`` μ: also keep the current outputs on the keys of every earlier edit,
      μ‖R·W·K_p − W·K_p‖² (the rotation analogue of AlphaEdit's K_p·K_pᵀ term), through
      E = W·K_p·K_pᵀ·Wᵀ, updated E ← R·E·Rᵀ + (R·A)(R·A)ᵀ after each edit.
    * ``match_norms``: rescale each target column to ‖A_E‖, since a rotation preserves ‖W·k‖ and
      cannot meet a target of another norm; only its direction is fitted.

    The solve is M = λ·G + μ·E + V·Aᵀ in every case (one polar factor)."""
    name = "mose"
    supports_edit_weights = True    # update(..., edit_weights=w): MOSEConfig.land_retries

    def __init__(self, lam: float, polar_method: str = "svd", solve_dtype: torch.dtype = torch.float64,
                 retain: str = "current", edit_memory: float = 0.0, match_norms: bool = False,
                 side: str = "output"):
        if side != "output":
            raise ValueError(f"MOSERule rotates the output side; got side={side!r} (see MOSEInputRule)")
        check_options(lam, retain, edit_memory)
        self.side = side
        self.lam = lam
        self.polar_method = polar_method
        self.solve_dtype = solve_dtype
        self.retain = retain
        self.edit_memory = float(edit_memory)
        self.match_norms = bool(match_norms)
        self.gram: dict[int, torch.Tensor] = {}      # P = W·C0·Wᵀ ("current") or G = W0·C0·Wᵀ ("original")
        self.gram_trace: dict[int, float] = {}       # tr(W0·C0·W0ᵀ), invariant under rotations
        self.memory: dict[int, torch.Tensor] = {}    # E = W·K_p·K_pᵀ·Wᵀ (edit_memory > 0)

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        """Build P = W·C0·Wᵀ for a layer (once)."""
        if layer not in self.gram:
            Wd = W.to(self.solve_dtype)
            P = Wd @ C0.to(device=W.device, dtype=self.solve_dtype) @ Wd.T
            self.gram[layer] = 0.5 * (P + P.T)
            self.gram_trace[layer] = float(torch.trace(self.gram[layer]))
            if self.edit_memory:
                self.memory[layer] = torch.zeros_like(self.gram[layer])

    def _retention(self, layer: int) -> tuple[torch.Tensor, float, float | None]:
        """(retention matrix, its weight, objective constant) for the solver."""
        if self.retain == "current" and not self.edit_memory:
            return self.gram[layer], self.lam, None          # the paper's problem, unchanged
        P = self.lam * self.gram[layer]
        trace = self.lam * self.gram_trace[layer]
        if self.edit_memory:
            P = P + self.edit_memory * self.memory[layer]
            trace += self.edit_memory * float(torch.trace(self.memory[layer]))
        return P, 1.0, trace

    def solve(self, layer: int, A: torch.Tensor, V: torch.Tensor) -> tuple[SolveResult, Rotation, float]:
        t = time.perf_counter()
        P, lam, trace = self._retention(layer)
        res, rot = solve_polar(P, A, V, lam, self.polar_method, self.solve_dtype, trace)
        return res, rot, time.perf_counter() - t

    def apply(self, layer: int, W: torch.Tensor, rot: Rotation) -> float:
        """W ← R·W in place (through the backend); the retention state follows.  Returns seconds."""
        t = time.perf_counter()
        # A float64 product costs little at CPU sizes and removes one rounding per edit; on the
        # GPU the float32 kernel is used with R already orthonormal in float64.
        compute = torch.float64 if W.device.type == "cpu" else torch.float32
        rot = rot.to(W.device)
        rot.apply_(W, compute if W.dtype != torch.float64 else None)
        if self.retain == "current":
            self.gram[layer] = rot.rotate_gram(self.gram[layer])
        else:
            self.gram[layer] = rot.rotate_right(self.gram[layer])
        if layer in self.memory:
            self.memory[layer] = rot.rotate_gram(self.memory[layer])
        if W.is_cuda:
            torch.cuda.synchronize(W.device)
        return time.perf_counter() - t

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               remember: bool = True, edit_weights: torch.Tensor | None = None) -> UpdateResult:
        """The editor's entry: A_E = W·K_E, V_E = A_E + resid; solve, rotate W in place.  With
        ``remember`` (the edit's last pass) the edited outputs join the edit memory.
        ``edit_weights`` w (n, > 0): the edit term becomes Σ_j w_j·v_j·a_jᵀ (see ``weighted``)."""
        A = W.to(self.solve_dtype) @ K.to(W.device, self.solve_dtype)          # d_out × n
        V = A + resid.to(W.device, self.solve_dtype)
        if self.match_norms:
            norms = V.norm(dim=0).clamp_min(torch.finfo(V.dtype).tiny)
            V = V * (A.norm(dim=0) / norms)
        solved, rot, t_solve = self.solve(layer, *weighted(A, V, edit_weights))
        t_apply = self.apply(layer, W, rot)
        if remember and layer in self.memory:
            # the edited outputs R·A on this edit's keys join the memory E (after E ← R·E·Rᵀ)
            RA = rot.left(A)
            self.memory[layer] = self.memory[layer] + RA @ RA.T
            rot.memory_added = RA
        return UpdateResult(objective=solved.objective, objective_identity=solved.objective_identity,
                            orth_error=solved.orth_error, undo=rot.to("cpu"), seconds_solve=t_solve,
                            seconds_apply=t_apply)

    def revert(self, layer: int, W: torch.Tensor, rot: Rotation) -> None:
        """Undo a rotation: W ← Rᵀ·W and the retention state with it (memory: remove the edit's
        outputs first, then rotate back)."""
        forget_edit(self.memory, layer, rot)
        self.apply(layer, W, rot.transpose())

    def after_edit(self, layer: int, K: torch.Tensor) -> None:
        """Nothing to record: P (and E, with edit memory) already carry all retention state."""

    def snapshot(self) -> dict:
        """{layer: P or G} plus {"E<layer>": E} with edit memory (flat, so run folders store it
        as tensors S<key>; the no-memory layout is the one earlier run folders hold)."""
        return {**{l: p.clone() for l, p in self.gram.items()},
                **{f"E{l}": e.clone() for l, e in self.memory.items()}}

    def restore(self, snap: dict) -> None:
        self.gram = {k: v for k, v in snap.items() if isinstance(k, int)}
        self.memory = {int(k[1:]): v for k, v in snap.items() if isinstance(k, str) and k.startswith("E")}
