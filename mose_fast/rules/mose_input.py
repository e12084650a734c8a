"""MOSE with the rotation on the input side: W ← W·Q, Q ∈ O(d_in).

A left rotation R acts in the output space, which the outputs of ordinary text fill; it cannot
move W·k_E without moving every corpus output that shares its direction, and it cannot change
‖W·k_E‖ at all.  A right rotation preserves exactly the same things (‖W‖_F and every singular
value: W·Q has W's SVD with V rotated) but acts on the key space, where an edit key is rare in the
corpus statistics — the freedom the additive editors (MEMIT, AlphaEdit) use through C0⁻¹·k.

The edit, per layer, in two closed-form steps:

1. **Target keys.**  Find k* with W·k* = v_E that a rotation can reach, ‖k*‖ = ‖k_E‖:
   the corpus-cheapest shift  d = C0⁻¹·Wᵀ·(W·C0⁻¹·Wᵀ)⁻¹·resid  (min dᵀ·C0·d subject to W·d = resid),
   then a move along null(W) — which does not change W·k* — that brings the norm back to ‖k_E‖
   (the smaller root of a quadratic; if no move along null(W) reaches it, the one that comes
   closest, and the rest of the residual is left to the later layers as with any unmet edit).
2. **Rotation.**  The orthogonal Procrustes problem in key space,
       min_Q  λ‖Q·K0 − Q_totᵀ·K0‖²  +  μ‖Q·K_p − K_p‖²  +  ‖Q·K_E − K*‖²,
   which keeps the unedited model's outputs on the corpus keys (Q_tot: the product of the earlier
   rotations, so W·Q·Q_totᵀ = W0 on them) and every earlier edit's keys K_p where they are.
   Solved as Q = polar(λ·G + μ·E + K*·K_Eᵀ), G = Q_totᵀ·C0, E = K_p·K_pᵀ.

State per layer (d = d_in):
  * ``chol``   the float64 Cholesky factor of C0 + ρ·I — the one copy of C0 the rule keeps
               (the preimage solves need float64: C0's eigenvalues span many decades);
  * ``cross``  G = Q_totᵀ·C0, float64 for d ≤ 8192 and float32 above (a rotation's rounding in
               G moves the retention term by ~1e-7 relative, far below what an edit changes);
  * ``memory`` a factor F of E = F·Fᵀ (float32, d × m), never the d × d matrix E: the earlier edits'
               keys as columns (a float32 model's keys exactly) until there are more than d of them,
               then the d × d triangular factor of their QR (``compress_memory``), which every later
               edit's keys extend and which is compressed again — so E is exact to float32 rounding
               and the memory is at most d × (d + n) however many edits are kept;
  * ``wwt``    W·Wᵀ (d_out × d_out), constant under W ← W·Q;
  * ``sgram``  S = W·C0⁻¹·Wᵀ (d_out × d_out, float64), the metric of the preimage step, moved by each
               kept edit's low-rank change (O(d_in²·k), see ``PreimageGramChange``) where that is cheaper
               than building it again from the rotated W (O(d_in²·d_out), ``gram_by_change``): small
               batches move it, a rotation of more than ~d_out/3 directions leaves it to be rebuilt at
               the layer's next edit.
The retention matrix λ·G + μ·E is applied as products inside the Krylov solve; only the exact
solve (small d) forms it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import Rule, UpdateResult, layer_tensors
from .rotation import MOSE_OPTIONS, RetentionOperator, Rotation, effective_lam, solve_polar, weighted

# C0 of a SwiGLU/GELU key space has eigenvalues down to ~0; a ridge of 1e-8 of its mean
# eigenvalue keeps the Cholesky factor finite without moving the preimage of any direction the
# corpus actually uses.
PREIMAGE_RIDGE = 1e-8
# G is kept in float64 up to this width, in float32 above.
CROSS_F64_MAX_DIM = 8192


def cross_dtype(d: int) -> torch.dtype:
    return torch.float64 if d <= CROSS_F64_MAX_DIM else torch.float32


def ridged_cholesky(C: torch.Tensor, mean_eigenvalue: float, where: str) -> torch.Tensor:
    """The Cholesky factor of C + ρ·c̄·I, ρ = ``PREIMAGE_RIDGE`` (c̄ the mean eigenvalue), overwriting C.
    A C of lower rank than its width (statistics over fewer tokens than the key dimension) can fail
    at that ridge in floating point; ρ then grows tenfold at a time, with a warning, up to 1e-3."""
    import logging
    rho, added = PREIMAGE_RIDGE, 0.0
    while True:
        C.diagonal().add_(rho * mean_eigenvalue - added)
        added = rho * mean_eigenvalue
        L, info = torch.linalg.cholesky_ex(C)
        if int(info) == 0:
            return L
        if rho >= 1e-3:
            raise ValueError(f"the key statistics at {where} are not positive definite even with a ridge of "
                             f"{rho:g} of their mean eigenvalue: compute them over more tokens (stats_tokens) than "
                             f"the key dimension {C.shape[0]}")
        rho *= 10
        logging.getLogger(__name__).warning("key statistics at %s are rank deficient: ridge raised to %g of the "
                                            "mean eigenvalue (use more stats_tokens than %d)", where, rho, C.shape[0])


def preimage_gram(W: torch.Tensor, C0_chol: torch.Tensor, block: int = 512) -> torch.Tensor:
    """S = W·C0⁻¹·Wᵀ = XᵀX with X = L⁻¹·Wᵀ (d_out × d_out; L the Cholesky factor of C0): one triangular
    solve of d_in² · d_out and one product of d_in · d_out², X formed ``block`` columns at a time."""
    X = torch.empty(W.shape[1], W.shape[0], dtype=W.dtype, device=W.device)
    for i in range(0, W.shape[0], block):
        X[:, i:i + block] = torch.linalg.solve_triangular(C0_chol, W[i:i + block].T, upper=False)
    S = X.T @ X
    return 0.5 * (S + S.T)


def gram_by_change(d_in: int, d_out: int, k: int) -> bool:
    """Whether moving S by a rotation of ``k`` directions (``PreimageGramChange``, ≈ 2·d_in²·k +
    4·d_out·d_in·k + 2·d_in·k² + 8·d_out·k² + 4·d_out²·k operations) costs less than building it
    again from the rotated W (``preimage_gram``, d_in²·d_out + 2·d_in·d_out²)."""
    change = 2 * d_in * d_in * k + 4 * d_out * d_in * k + 2 * d_in * k * k + 8 * d_out * k * k + 4 * d_out * d_out * k
    return change < d_in * d_in * d_out + 2 * d_in * d_out * d_out


@dataclass
class PreimageGramChange:
    """How S = W·C0⁻¹·Wᵀ changes when W ← W·Q, Q = I + U·D'·Uᵀ (D' = Rk − I; a dense Q is U = I):
    with B = C0⁻¹,  S' = S + (WBU)·D'ᵀ·(WU)ᵀ + (WU)·D'·(WBU)ᵀ + (WU)·D'·(UᵀBU)·D'ᵀ·(WU)ᵀ  (W the
    matrix before the rotation).  Kept as the factors, O(d_out·k); O(d_in²·k) to build."""
    WU: torch.Tensor
    WBU: torch.Tensor
    UBU: torch.Tensor
    D: torch.Tensor

    @classmethod
    def of(cls, W: torch.Tensor, rot: Rotation, C0_chol: torch.Tensor) -> "PreimageGramChange":
        if rot.R is not None:
            U = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
            D = rot.R.to(W) - U
        else:
            U = rot.Q.to(W)
            D = rot.Rk.to(W) - torch.eye(rot.Rk.shape[0], dtype=W.dtype, device=W.device)
        BU = torch.cholesky_solve(U, C0_chol)
        return cls(WU=W @ U, WBU=W @ BU, UBU=U.T @ BU, D=D)

    def delta(self) -> torch.Tensor:
        cross = self.WBU @ self.D.T @ self.WU.T
        return cross + cross.T + self.WU @ self.D @ self.UBU @ self.D.T @ self.WU.T

    def to(self, device) -> "PreimageGramChange":
        return PreimageGramChange(*(t.to(device) for t in (self.WU, self.WBU, self.UBU, self.D)))


def reachable_key_targets(W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor, C0_chol: torch.Tensor,
                          WWt: torch.Tensor, S: torch.Tensor | None = None) -> torch.Tensor:
    """K* (d_in × n): W·K* = W·K + resid where reachable, ‖K*[:, j]‖ = ‖K[:, j]‖ (see module doc).

    W: d_out × d_in, K: d_in × n, resid: d_out × n, C0_chol: Cholesky factor of C0 (+ ridge),
    WWt = W·Wᵀ (invariant under right rotations), S = W·C0⁻¹·Wᵀ (``preimage_gram``; computed here
    when not given).  With S the step costs O(d_in²·n): d = C0⁻¹·Wᵀ·(S⁻¹·resid)."""
    if S is None:
        S = preimage_gram(W, C0_chol)
    # K + the corpus-cheapest preimage of resid
    shifted = K + torch.cholesky_solve(W.T @ torch.linalg.solve(S, resid), C0_chol)
    # the part of each column in null(W): removing a fraction t of it changes the norm, not W·k
    in_null = shifted - W.T @ torch.linalg.solve(WWt, W @ shifted)
    a = in_null.pow(2).sum(0)                                  # ‖n‖²
    c = shifted.pow(2).sum(0) - K.pow(2).sum(0)                # ‖k + d‖² − ‖k‖²
    # ‖shifted − t·n‖² = ‖k‖²  ⇔  a·t² − 2a·t + c = 0  ⇔  t = 1 − √(1 − c/a); c > a: t = 1 comes closest
    ratio = torch.where(a > 0, c / a.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
    t = 1.0 - torch.sqrt((1.0 - ratio).clamp_min(0.0))
    return shifted - in_null * t


# the edit memory's dtype: a float32 model's keys exactly, its compressed factor to float32 rounding (the
# memory is a soft penalty on the rotation, which is solved and applied in float64 either way)
MEMORY_DTYPE = torch.float32


def compress_memory(F: torch.Tensor) -> torch.Tensor:
    """A factor with F·Fᵀ's product in at most d columns: F itself while it has ≤ d columns, else Rᵀ
    from the QR factorisation Fᵀ = Q·R (d × d lower triangular; Rᵀ·R = F·Fᵀ), formed in float64."""
    d, m = F.shape
    if m <= d:
        return F
    R = torch.linalg.qr(F.to(torch.float64).T, mode="r")[1]
    return R.T.to(F.dtype).contiguous()


@dataclass
class InputRecord:
    rotation: Rotation                  # Q, on the host
    keys: torch.Tensor | None           # the edit's keys (d_in × n, host): join the memory
    preimage: PreimageGramChange | None = None   # how S = W·C0⁻¹·Wᵀ moves (host); None: rebuilt
    # the memory before this edit's commit, where the commit compressed it (so undo can put it back)
    memory_before: torch.Tensor | None = None


def memory_trace(F: torch.Tensor) -> float:
    """tr(F·Fᵀ) = ‖F‖²_F, accumulated in float64."""
    return float(torch.linalg.vector_norm(F, dtype=torch.float64) ** 2)


class MOSEInputRule(Rule):
    """MOSE with W ← W·Q (``rule_hparams: {"side": "input", "edit_memory": μ, "memory_cap": c}``).

    ``edit_memory`` μ keeps every earlier edit's keys where the edit put them; ``memory_cap`` c
    bounds its weight: μ_eff = min(μ, c·λ·tr(C0)/tr(E)).  The memory grows with every edit while a
    new edit's term keeps weight 1, so without a cap it eventually outweighs new edits, which then
    stop landing; with the cap it grows until μ·tr(E) reaches c·λ·tr(C0) and then stays there."""
    name = "mose"
    OPTIONS = MOSE_OPTIONS
    supports_edit_weights = True

    def __init__(self, lam: float, polar_method: str = "auto", solve_dtype: torch.dtype = torch.float64, **hparams):
        opts = self.check_options({"side": "input", **hparams})     # this class's side unless told
        if opts["side"] != "input":
            raise ValueError(f"MOSEInputRule rotates the input side; got side={opts['side']!r}")
        if opts["memory_cap"] is not None and not opts["edit_memory"] > 0:
            raise ValueError(f"rule_hparams.memory_cap = {opts['memory_cap']} needs edit_memory > 0")
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"MOSE λ must be ≥ 0, got {lam!r}")
        self.lam, self.lam_unit = float(lam), opts["lam_unit"]
        self.edit_memory = float(opts["edit_memory"])
        self.memory_cap = None if opts["memory_cap"] is None else float(opts["memory_cap"])
        self.polar_method, self.solve_dtype = polar_method, solve_dtype
        self.chol: dict[int, torch.Tensor] = {}
        self.c0_trace: dict[int, float] = {}
        self.wwt: dict[int, torch.Tensor] = {}
        self.cross: dict[int, torch.Tensor] = {}
        self.memory: dict[int, torch.Tensor] = {}     # d_in × (keys of every kept edit), float64
        self.sgram: dict[int, torch.Tensor] = {}      # S = W·C0⁻¹·Wᵀ as kept edits moved it
        # S built from the current W by an edit not yet committed (not state: the weights it was
        # built from stay until a commit or an undo, which drop it)
        self._built: dict[int, torch.Tensor] = {}

    # --- state ------------------------------------------------------------------------------------
    @classmethod
    def planned_state(cls, d_out, d_in, kept_keys, hparams):
        G = cross_dtype(d_in)
        parts = {"Cholesky factor of C0 (float64)": 8 * d_in * d_in,
                 f"cross Gram G ({G})": torch.empty((), dtype=G).element_size() * d_in * d_in,
                 "W·Wᵀ (float64)": 8 * d_out * d_out, "S = W·C0⁻¹·Wᵀ (float64)": 8 * d_out * d_out}
        if hparams.get("edit_memory"):
            # key columns, compressed to a d_in × d_in factor once there are more (compress_memory)
            size = torch.empty((), dtype=MEMORY_DTYPE).element_size()
            name = f"edit memory (min(edits, d_in) columns, {str(MEMORY_DTYPE)[6:]})"
            parts[name] = size * d_in * min(kept_keys, d_in)
        return parts

    def prepare(self, layer: int, W: torch.Tensor, C0: torch.Tensor) -> None:
        if layer in self.chol:
            return
        device, d = W.device, C0.shape[0]
        C0 = C0.to(device=device, dtype=torch.float64)
        C0 = 0.5 * (C0 + C0.T)
        trace = float(torch.trace(C0))
        if layer not in self.cross:          # restored state (a resumed run) is kept
            self.cross[layer] = C0.to(cross_dtype(d), copy=True)    # not C0 itself: the ridge goes on it below
        else:
            self.cross[layer] = self.cross[layer].to(device)
        if self.edit_memory:
            kept = self.memory.get(layer)
            self.memory[layer] = (torch.zeros(d, 0, dtype=MEMORY_DTYPE, device=device) if kept is None
                                  else compress_memory(kept.to(device, MEMORY_DTYPE)))
        self.chol[layer] = ridged_cholesky(C0, trace / d, f"layer {layer}")
        del C0
        Wd = W.to(torch.float64)
        self.wwt[layer] = Wd @ Wd.T
        self.c0_trace[layer] = trace

    def lam_for(self, layer: int) -> float:
        return effective_lam(self.lam, self.lam_unit, self.chol[layer].shape[0])

    def memory_weight(self, layer: int) -> float:
        """μ, or with ``memory_cap`` c: min(μ, c·λ·tr(C0)/tr(E))."""
        mu = self.edit_memory
        if mu and self.memory_cap is not None:
            held = memory_trace(self.memory[layer])
            limit = self.memory_cap * self.lam_for(layer) * self.c0_trace[layer]
            if mu * held > limit:
                mu = limit / held
        return mu

    def retention(self, layer: int) -> tuple[RetentionOperator, float]:
        """(λ·G + μ·E as an operator, the objective's constant λ·tr(C0) + μ·tr(E))."""
        lam = self.lam_for(layer)
        mu = self.memory_weight(layer) if self.edit_memory else 0.0
        F = self.memory.get(layer)
        op = RetentionOperator(self.cross[layer], lam, None if F is None else F.to(torch.float64), mu)
        const = lam * self.c0_trace[layer]
        if op.F is not None:
            const += mu * memory_trace(op.F)
        return op, const

    # --- the edit ---------------------------------------------------------------------------------
    def update(self, layer: int, W: torch.Tensor, K: torch.Tensor, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> UpdateResult:
        t = time.perf_counter()
        K = K.to(W.device, torch.float64)
        resid = resid.to(W.device, torch.float64)
        for name, x in (("keys", K), ("residual", resid)):
            if not torch.isfinite(x).all():
                raise ValueError(f"non-finite {name} at layer {layer}; refusing to rotate")
        Wd = W.to(torch.float64)
        S = self.sgram.get(layer)
        if S is None:
            S = self._built.get(layer)
        if S is None:                        # S built from W: O(d_in²·d_out); kept for this edit's retries
            S = self._built[layer] = preimage_gram(Wd, self.chol[layer])
        K_target = reachable_key_targets(Wd, K, resid, self.chol[layer], self.wwt[layer], S)
        P, const = self.retention(layer)
        solved, rot = solve_polar(P, *weighted(K, K_target, edit_weights), self.polar_method, self.solve_dtype, const)
        k = W.shape[1] if rot.R is not None else rot.Q.shape[1]
        # None: S is built again from the rotated W at the layer's next edit (see gram_by_change)
        change = PreimageGramChange.of(Wd, rot, self.chol[layer]) if gram_by_change(W.shape[1], W.shape[0], k) else None
        del Wd
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            rot.apply_right_(W)
        if W.is_cuda:
            torch.cuda.synchronize(W.device)
        record = InputRecord(rot.to("cpu"), K.to("cpu") if self.edit_memory else None,
                             None if change is None else change.to("cpu"))
        return UpdateResult(objective=solved.objective, objective_identity=solved.objective_identity,
                            orth_error=solved.orth_error, undo=record, seconds_solve=t_solve,
                            seconds_apply=time.perf_counter() - t)

    def commit(self, layer: int, record: InputRecord) -> None:
        """G ← Qᵀ·G; the edit's keys join the memory (compressed to d columns once it has more)."""
        with torch.no_grad():
            record.rotation.transpose().apply_left_(self.cross[layer])
        if record.keys is not None and layer in self.memory:
            old = self.memory[layer]
            new = compress_memory(torch.cat([old, record.keys.to(old)], 1))
            if new.shape[1] < old.shape[1] + record.keys.shape[1]:
                record.memory_before = old.to("cpu")
            self.memory[layer] = new
        base = self.sgram.pop(layer, None)
        built = self._built.pop(layer, None)
        base = built if base is None else base
        if record.preimage is not None and base is not None:
            self.sgram[layer] = base + record.preimage.to(base.device).delta()
        # else: built again from the rotated W at the layer's next edit

    def undo(self, layer: int, record: InputRecord) -> None:
        """G ← Q·G; the edit's keys (the last ones in the memory) leave it."""
        with torch.no_grad():
            record.rotation.apply_left_(self.cross[layer])
        if record.memory_before is not None and layer in self.memory:
            self.memory[layer] = record.memory_before.to(self.memory[layer].device)
            record.memory_before = None
        elif record.keys is not None and layer in self.memory:
            n = record.keys.shape[1]
            self.memory[layer] = self.memory[layer][:, :self.memory[layer].shape[1] - n].contiguous()
        self._built.pop(layer, None)
        if record.preimage is None:
            self.sgram.pop(layer, None)
        elif layer in self.sgram:
            self.sgram[layer] = self.sgram[layer] - record.preimage.to(self.sgram[layer].device).delta()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"G.{l}": g for l, g in self.cross.items()},
                **{f"K.{l}": k for l, k in self.memory.items()},
                **{f"S.{l}": x for l, x in self.sgram.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith(("G.", "K.", "S."))]
        if unknown:
            raise ValueError(f"not a MOSE input-side state: {unknown}")
        self.cross = layer_tensors(state, "G")
        self.memory = {l: compress_memory(k.to(MEMORY_DTYPE)) for l, k in layer_tensors(state, "K").items()}
        # S as it was kept (a state without it: rebuilt from the restored weights at the next edit)
        self.sgram = {l: x.to(torch.float64) for l, x in layer_tensors(state, "S").items()}
        self._built = {}
