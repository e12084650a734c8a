"""MOSE with the rotation on the input side: W ← W·Q, Q ∈ O(d_in).

Why (issue 4, ``scripts/edit_frontier.py``): a left rotation R acts in the d_out-dim output
space, which the outputs of ordinary text fill; it cannot move W·k_E without moving every corpus
output that shares its direction, and it cannot change ‖W·k_E‖ at all.  A right rotation
preserves exactly the same things (‖W‖_F and every singular value: W·Q has W's SVD with V
rotated) but acts on the d_in-dim key space, where an edit key is rare in the corpus statistics —
the freedom the additive editors (MEMIT, AlphaEdit) use through C0⁻¹·k.

The edit, per layer, in two closed-form steps:

1. **Target keys.**  Find k* with W·k* = v_E that a rotation can reach, ‖k*‖ = ‖k_E‖:
   the corpus-cheapest shift  d = C0⁻¹·Wᵀ·(W·C0⁻¹·Wᵀ)⁻¹·resid  (min dᵀ·C0·d subject to W·d = resid),
   then a move along null(W) — which does not change W·k* — that brings the norm back to ‖k_E‖
   (the smaller root of a quadratic; if no move along null(W) reaches it, the one that comes
   closest, and the rest of the residual is left to the later layers as with any unmet edit).
2. **Rotation.**  The orthogonal Procrustes problem in key space,
       min_Q  λ‖Q·K0 − Y0‖²  +  μ‖Q·K_p − K_p‖²  +  ‖Q·K_E − K*‖²,
   with Y0 = K0 ("current": keep this model's outputs) or Q_totᵀ·K0 ("original": keep the unedited
   model's, Q_tot the product of the earlier rotations), K_p the keys of earlier edits.  Solved as
   R = polar(λ·G + μ·E + K*·K_Eᵀ),  G = Y0·K0ᵀ/N (C0, or Q_totᵀ·C0),  E = Σ K_p·K_pᵀ  — the same
   problem as the output-side solve, so ``solve_rotation`` / ``solve_subspace`` serve unchanged.

State per layer is d_in × d_in (C0, its Cholesky factor, G, E): 4·d_in² float64, about 75 MB at
d_in = 1536.  The subspace methods ("krylov", "randomized") never form an SVD of d_in × d_in and
apply Q as the rank-k update W ← W + (W·U)·(Rk − I)·Uᵀ; "svd" is the exact reference.
"""
from __future__ import annotations

import time

import torch

from .base import UpdateResult
from .mose import Rotation, check_edit_weights, check_options, forget_edit, solve_polar, weighted

# C0 of a SwiGLU/GELU key space has eigenvalues down to ~0; a ridge of 1e-8 of its mean
# eigenvalue keeps the Cholesky factor finite without moving the preimage of any direction the
# corpus actually uses.
PREIMAGE_RIDGE = 1e-8


def reachable_key_targets(W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor, C0_chol: torch.Tensor,
                          WWt: torch.Tensor) -> torch.Tensor:
    """K* (d_in × n): W·K* = W·K + resid where reachable, ‖K*[:, j]‖ = ‖K[:, j]‖ (see module doc).

    W: d_out × d_in, K: d_in × n, resid: d_out × n, C0_chol: Cholesky factor of C0 (+ ridge),
    WWt = W·Wᵀ (invariant under right rotations, so computed once per layer)."""
    Y = torch.cholesky_solve(W.T, C0_chol)                     # C0⁻¹·Wᵀ
    shifted = K + Y @ torch.linalg.solve(W @ Y, resid)         # K + corpus-cheapest preimage of resid
    # the part of each column in null(W): removing a fraction t of it changes the norm, not W·k
    in_null = shifted - W.T @ torch.linalg.solve(WWt, W @ shifted)
    a = in_null.pow(2).sum(0)                                  # ‖n‖²
    c = shifted.pow(2).sum(0) - K.pow(2).sum(0)                # ‖k + d‖² − ‖k‖²
    # ‖shifted − t·n‖² = ‖k‖²  ⇔  a·t² − 2a·t + c = 0  ⇔  t = 1 − √(1 − c/a); c > a: t = 1 comes closest
    ratio = torch.where(a > 0, c / a.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
    t = 1.0 - torch.sqrt((1.0 - ratio).clamp_min(0.0))
    return shifted - in_null * t


class MOSEInputRule:
    """MOSE with W ← W·Q (``rule_hparams: {"side": "input", ...}``); options as ``MOSERule``:
    ``retain`` "current" | "original", ``edit_memory`` μ ≥ 0, and

    * ``memory_cap`` c (off by default): the memory E = Σ K_p·K_pᵀ grows with every edit while a
      new edit's term K*·K_Eᵀ keeps weight 1, so after enough edits μ·E outweighs it and new edits
      stop landing (issue 4: μ·tr(E)/λ·tr(C0) ≈ 60–100 after 300 edits, 157–273 after 800, when
      only half the edits land).  With a cap the memory's weight is μ_eff = min(μ, c·λ·tr(C0)/tr(E)):
      it grows with the edits until μ·tr(E) reaches c·λ·tr(C0), then stays there.
    * ``template_keys`` "mean" (default) | "memory" | "all": which keys stand for a request.  "mean"
      is MEMIT's, one key per request averaged over the context templates.  A paraphrase reaches
      the subject through another context, so its key is one more sample of the same cloud; with
      "memory" the edit memory keeps the cloud's second moment Σ_t ω_t·k_t·k_tᵀ (ω the templates'
      weights in the mean) instead of k̄·k̄ᵀ, so later rotations keep every context's key in place,
      not only the mean; "all" also fits the rotation on every context's key, Σ_t ω_t·k*_t·k_tᵀ
      (k*_t: the reachable target of k_t for the request's residual).  Both need the per-template
      keys, passed as ``update(..., per_template=(K_t, ω))`` (the editor does).
    * ``null_space`` τ (off by default): rotate only inside U = span of C0's eigenvectors with
      eigenvalue < τ × the largest (AlphaEdit's projector, relative threshold), Q = I + U·(Q_U − I)·Uᵀ.
      Why: the soft retention λ·‖(Q − I)·K0‖² still lets every rotation move keys along the
      directions in which the contexts of one subject differ (ordinary text varies along them), so
      later edits erode earlier edits' paraphrases; with Q fixed on C0's dominant subspace a key's
      output changes only through its component in U.  The target keys are then reached inside U
      (k* − k ∈ U, ‖Uᵀ·k*‖ = ‖Uᵀ·k‖) and the Procrustes problem is the same one restricted to U:
      argmax tr(Qᵀ·M) over such Q is Q_U = polar(Uᵀ·M·U).  Measured on SmolLM2 (README, batch 10):
      the model is kept best of any run, but the edits generalise less (paraphrase 0.78 against 0.87
      after 100 edits) — a subject's contexts share mostly dominant directions.
    * ``preimage_ridge`` ρ (default 1e-8): the target keys' shift minimises dᵀ·(C0 + ρ·c̄·I)·d (c̄ the
      mean eigenvalue of C0).  A larger ρ trades corpus-cheapness of the shift for a shorter one —
      ρ → ∞ gives the minimum-norm preimage — and so a smaller rotation angle ‖d‖/‖k‖, which moves
      the other keys of the subject's cloud (its paraphrases' keys) less off the edit's direction.
      Measured on SmolLM2 (README, batch 10): ρ = 10 and 100 are no better than 1e-8 from 300 edits."""
    name = "mose"
    supports_edit_weights = True    # update(..., edit_weights=w): MOSEConfig.land_retries
    TEMPLATE_KEYS = ("mean", "memory", "all")

    def __init__(self, lam: float, polar_method: str = "svd", solve_dtype: torch.dtype = torch.float64,
                 retain: str = "current", edit_memory: float = 0.0, side: str = "input",
                 memory_cap: float | None = None, template_keys: str = "mean",
                 null_space: float | None = None, preimage_ridge: float = PREIMAGE_RIDGE):
        if side != "input":
            raise ValueError(f"MOSEInputRule rotates the input side; got side={side!r}")
        check_options(lam, retain, edit_memory)
        if memory_cap is not None and not (memory_cap > 0.0 and edit_memory > 0.0):
            raise ValueError(f"MOSE memory_cap must be > 0 and needs edit_memory > 0; got memory_cap={memory_cap}, "
                             f"edit_memory={edit_memory}")
        if template_keys not in self.TEMPLATE_KEYS:
            raise ValueError(f"MOSE template_keys={template_keys!r}: choose one of {self.TEMPLATE_KEYS}")
        if template_keys == "memory" and not edit_memory > 0.0:
            raise ValueError("MOSE template_keys='memory' changes what the edit memory holds; it needs edit_memory > 0")
        if null_space is not None and not 0.0 < null_space <= 1.0:
            raise ValueError(f"MOSE null_space is a threshold relative to C0's largest eigenvalue, in (0, 1]; "
                             f"got {null_space}")
        if not preimage_ridge > 0.0 or preimage_ridge == float("inf"):
            raise ValueError(f"MOSE preimage_ridge must be finite and > 0 (relative to C0's mean eigenvalue); got {preimage_ridge}")
        self.side, self.template_keys = side, template_keys
        self.preimage_ridge = float(preimage_ridge)
        self.null_space = None if null_space is None else float(null_space)
        self.lam, self.polar_method, self.solve_dtype = lam, polar_method, solve_dtype
        self.retain, self.edit_memory = retain, float(edit_memory)
        self.memory_cap = None if memory_cap is None else float(memory_cap)
        self.C0: dict[int, torch.Tensor] = {}        # constant
        self.C0_chol: dict[int, torch.Tensor] = {}   # constant: Cholesky factor of C0 + ridge
        self.WWt: dict[int, torch.Tensor] = {}       # constant under W ← W·Q
        self.cross: dict[int, torch.Tensor] = {}     # G = Q_totᵀ·C0 (retain "original" only)
        self.memory: dict[int, torch.Tensor] = {}    # E = Σ K_p·K_pᵀ (edit_memory > 0)
        self.basis: dict[int, torch.Tensor] = {}     # U, d_in × r (null_space only), constant
        self.basis_chol: dict[int, torch.Tensor] = {}  # Cholesky factor of Uᵀ·C0·U (+ ridge), r × r
        self.basis_WWt: dict[int, torch.Tensor] = {}   # (W·U)·(W·U)ᵀ, constant: W·U ← W·U·Q_U

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        if layer in self.C0:
            return
        C0 = C0.to(device=W.device, dtype=self.solve_dtype)
        C0 = 0.5 * (C0 + C0.T)
        Wd = W.to(self.solve_dtype)
        ridge = self.preimage_ridge * float(torch.trace(C0)) / C0.shape[0]
        if self.null_space is not None:     # checked before any state is kept: a refusal leaves none
            evals, evecs = torch.linalg.eigh(C0)
            small = evals < self.null_space * evals.max()
            if not small.any():
                raise ValueError(f"MOSE null_space={self.null_space}: no eigenvalue of C0 at layer {layer} is below "
                                 "that fraction of the largest; nothing to rotate in")
            U = evecs[:, small].contiguous()
            WU = Wd @ U
            self.basis[layer] = U
            # Uᵀ·C0·U is diagonal (U: eigenvectors), so its Cholesky factor is √ of those eigenvalues
            self.basis_chol[layer] = torch.diag((evals[small].clamp_min(0.0) + ridge).sqrt())
            self.basis_WWt[layer] = WU @ WU.T
        self.C0[layer] = C0
        self.C0_chol[layer] = torch.linalg.cholesky(C0 + ridge * torch.eye(C0.shape[0], dtype=C0.dtype, device=C0.device))
        self.WWt[layer] = Wd @ Wd.T
        # state restored from a run folder (resume) is kept; fresh state otherwise
        if self.retain == "original" and layer not in self.cross:
            self.cross[layer] = C0.clone()
        if self.edit_memory and layer not in self.memory:
            self.memory[layer] = torch.zeros_like(C0)

    def memory_weight(self, layer: int) -> float:
        """μ, or with ``memory_cap`` c: min(μ, c·λ·tr(C0)/tr(E))."""
        mu = self.edit_memory
        if mu and self.memory_cap is not None:
            held = float(torch.trace(self.memory[layer]))
            limit = self.memory_cap * self.lam * float(torch.trace(self.C0[layer]))
            if mu * held > limit:
                mu = limit / held
        return mu

    def _retention(self, layer: int) -> tuple[torch.Tensor, float]:
        """(λ·G + μ·E, objective constant λ·tr(C0) + μ·tr(E)), both in U's coordinates with null_space."""
        U = self.basis.get(layer)
        inside = (lambda X: X) if U is None else (lambda X: U.T @ X @ U)
        G = self.cross[layer] if self.retain == "original" else self.C0[layer]
        P = self.lam * inside(G)
        trace = self.lam * float(torch.trace(inside(self.C0[layer])))
        if self.edit_memory:
            mu = self.memory_weight(layer)
            E = inside(self.memory[layer])
            P = P + mu * E
            trace += mu * float(torch.trace(E))
        return P, trace

    def _template_columns(self, layer: int, K: torch.Tensor, per_template) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K_t as d_in × (n·T) columns, request j's template t at j·T + t; each column's weight ω_t; T)."""
        if per_template is None:
            raise ValueError(f"MOSE template_keys={self.template_keys!r} needs the per-template keys "
                             "(update(..., per_template=(K_t, ω)))")
        Kt, omega = per_template
        Kt = Kt.to(K.device, self.solve_dtype)
        omega = torch.as_tensor(omega).to(K.device, self.solve_dtype).reshape(-1)
        if Kt.dim() != 3 or Kt.shape[:2] != K.shape or Kt.shape[2] != omega.numel():
            raise ValueError(f"per-template keys must be d_in × n × T = {tuple(K.shape)} × T with T weights; got "
                             f"{tuple(Kt.shape)} and {omega.numel()} weights")
        if not (torch.isfinite(Kt).all() and torch.isfinite(omega).all() and (omega > 0).all()):
            raise ValueError(f"non-finite per-template keys or template weights ≤ 0 at layer {layer}; refusing to rotate")
        return Kt.reshape(K.shape[0], -1), omega.repeat(K.shape[1]), omega.numel()

    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               remember: bool = True, edit_weights: torch.Tensor | None = None,
               per_template: tuple[torch.Tensor, torch.Tensor] | None = None) -> UpdateResult:
        """W ← W·Q towards the reachable key targets; with ``remember`` (the edit's last pass) the
        edit's keys join the memory E (unweighted).  ``edit_weights`` w: the edit term becomes
        Σ_j w_j·k*_j·k_jᵀ.  ``per_template`` (K_t: d_in × n × T, ω: T): every request's key in every
        context template, for ``template_keys`` "memory" / "all" (ignored with "mean")."""
        t = time.perf_counter()
        Wd = W.to(self.solve_dtype)
        K = K.to(W.device, self.solve_dtype)
        resid = resid.to(W.device, self.solve_dtype)
        for name, x in (("keys", K), ("residual", resid)):
            if not torch.isfinite(x).all():
                raise ValueError(f"non-finite {name} at layer {layer}; refusing to rotate")
        remembered = K                          # E += remembered·rememberedᵀ
        if self.template_keys != "mean":
            columns, omega, n_templates = self._template_columns(layer, K, per_template)
            remembered = columns * omega.sqrt()
        if self.template_keys == "all":
            # each context's key towards its own reachable target, weighted ω_t (× w_j of its request)
            if edit_weights is not None:
                omega = omega * check_edit_weights(edit_weights, K.shape[1]).to(omega).repeat_interleave(n_templates)
            K, resid, edit_weights = columns, resid.repeat_interleave(n_templates, dim=1), omega
        P, trace = self._retention(layer)
        U = self.basis.get(layer)      # null_space: the same two steps in U's coordinates (module doc)
        if U is None:
            K_in, W_in, chol, WWt = K, Wd, self.C0_chol[layer], self.WWt[layer]
        else:
            K_in, W_in, chol, WWt = U.T @ K, Wd @ U, self.basis_chol[layer], self.basis_WWt[layer]
        K_target = reachable_key_targets(W_in, K_in, resid, chol, WWt)
        solved, rot = solve_polar(P, *weighted(K_in, K_target, edit_weights), 1.0, self.polar_method,
                                  self.solve_dtype, trace)
        if U is not None:   # Q = I + U·(Q_U − I)·Uᵀ; a factored Q_U = I + V·(Rk − I)·Vᵀ gives I + (U·V)·(Rk − I)·(U·V)ᵀ
            rot = Rotation(Q=U, Rk=rot.R) if rot.R is not None else Rotation(Q=U @ rot.Q, Rk=rot.Rk)
        t_solve = time.perf_counter() - t
        t_apply = self.apply(layer, W, rot)
        if remember and self.edit_memory:
            self.memory[layer] = self.memory[layer] + remembered @ remembered.T
            rot.memory_added = remembered
        return UpdateResult(objective=solved.objective, objective_identity=solved.objective_identity,
                            orth_error=solved.orth_error, undo=rot.to("cpu"), seconds_solve=t_solve,
                            seconds_apply=t_apply)

    def apply(self, layer: int, W: torch.Tensor, rot: Rotation) -> float:
        """W ← W·Q in place (computed in float64: one rounding per edit) and G ← Qᵀ·G."""
        t = time.perf_counter()
        rot = rot.to(W.device)
        with torch.no_grad():
            Wd = W.to(torch.float64)
            if rot.R is not None:
                W.copy_((Wd @ rot.R.to(Wd)).to(W.dtype))
            else:   # W·(I + U·(Rk − I)·Uᵀ) = W + (W·U)·(Rk − I)·Uᵀ
                U, Rk = rot.Q.to(Wd), rot.Rk.to(Wd)
                eye = torch.eye(Rk.shape[0], dtype=Wd.dtype, device=Wd.device)
                W.copy_(torch.addmm(Wd, (Wd @ U) @ (Rk - eye), U.T).to(W.dtype))
        if self.retain == "original":
            self.cross[layer] = rot.transpose().left(self.cross[layer])     # Qᵀ·G
        return time.perf_counter() - t

    def revert(self, layer: int, W: torch.Tensor, rot: Rotation) -> None:
        """W ← W·Qᵀ, G ← Q·G, and this edit's keys leave the memory."""
        forget_edit(self.memory, layer, rot)
        self.apply(layer, W, rot.transpose())

    def after_edit(self, layer: int, K: torch.Tensor) -> None:
        """Nothing to record: the memory was updated in ``update``."""

    def snapshot(self) -> dict:
        return {**{f"G{l}": g.clone() for l, g in self.cross.items()},
                **{f"E{l}": e.clone() for l, e in self.memory.items()}}

    def restore(self, snap: dict) -> None:
        self.cross = {int(k[1:]): v for k, v in snap.items() if isinstance(k, str) and k.startswith("G")}
        self.memory = {int(k[1:]): v for k, v in snap.items() if isinstance(k, str) and k.startswith("E")}
