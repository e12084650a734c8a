"""MOSE on the FFN input projections, through a polynomial expansion of the activation.

Which matrices, and why they stay orthogonal transforms of the originals
-------------------------------------------------------------------------
One Q ∈ O(d_model) per layer rotates the FFN's input side:

    gated (Llama, Qwen2, Mistral):   W_gate ← W_gate·Q,  W_up ← W_up·Q
    GPT-2 / GPT-J / GPT-NeoX:        W_in ← W_in·Q        (c_fc Conv1D, fc_in, dense_h_to_4h)

Biases are untouched: W·Q·x + b is the original projection at Q·x, the bias does not meet Q.  Hence
MLP'(x) = MLP(Q·x) exactly — the same FFN read through a rotated input — and each W·Q has W's SVD
with V replaced by Qᵀ·V: ‖W‖_F and every singular value are exact.  W_down/W_out is not touched.

The expansion
-------------
The activation σ (SiLU in the gated families, GELU — whichever the module is — in the others)
stands between Q and the output.  It is replaced by a degree-p polynomial p(t) = Σ_k c_k t^k,
fitted by least squares on the layer's own pre-activation distribution (the histogram of
W_gate·x + b over the statistics corpus's tokens, ``memit.stats``).  In the expanded feature space
the polynomial FFN is linear: with g = W_gate·x + b_g (one coordinate per FFN unit j),

    p(g_j) = Σ_k c_k (w_jᵀx + b_j)^k = Σ_k c_k Σ_{m≤k} C(k, m)·b_j^{k−m}·⟨w_j^{⊗m}, x^{⊗m}⟩,

so MLP_p(x) = (a fixed linear map) · φ(x) with φ(x) = (x^{⊗0}, x^{⊗1}, …, x^{⊗p}) the monomials of
the input (up to degree p + 1 in the gated form, where p(g) multiplies u = W_up·x + b, linear in
x).  An input rotation
x ↦ Q·x acts on φ as ⊕_k Q^{⊗k}, which is orthogonal (Q^{⊗k} is), and
⟨w^{⊗k}, (Qx)^{⊗k}⟩ = ⟨(Qᵀw)^{⊗k}, x^{⊗k}⟩ — the orthogonal map in the expanded space is the lift of
Q, and mapping it back to the weights is exactly W ← W·Q.  The solve therefore happens in x-space
(d_model), where it is closed form, with the polynomial used only to decide where the edit key
must go.  The remainder σ − p is what the model misses: recorded per edit (below).

Keys, targets, solve
--------------------
Keys: the FFN input x at the subject's last token (averaged over the context templates).
Targets x*: MLP_p(x*) = MLP_p(x) + resid with ‖x*‖ = ‖x‖ (a rotation keeps the norm), by
Gauss–Newton with the analytic Jacobian of MLP_p,

    gated:      J = W_down·[diag(p'(g) ⊙ u)·W_gate + diag(p(g))·W_up],   g, u = W_gate·x + b, W_up·x + b
    non-gated:  J = W_out·diag(p'(g))·W_in,

on the sphere ‖x*‖ = ‖x‖, ``gn_steps`` steps.  Each step takes the corpus-cheapest shift in the
tangent space: with C_x = E[x xᵀ] = L·Lᵀ (the FFN input second moment, + the ridge of
mose_input.py) and r = target − MLP_p(x),

    d = argmin ‖J·d − r‖² + μ·dᵀC_x d   subject to  xᵀd = 0,   μ = ``gn_ridge`` · σ_max(J·L⁻ᵀ·Π)²

(Π the projector onto the tangent space in the whitened coordinates), then x ← (x + d)·‖x‖/‖x + d‖;
a step that does not lower ‖MLP_p(x) − target‖ is halved (up to 6 times), else the iteration ends.
Why not the input-side rule's ``reachable_key_targets`` (the exact C-cheapest preimage of J, then
the norm restored along null(J)): J is d_model × d_model and of full rank, so null(J) = {0}, the
preimage J⁻¹·r is the undamped step, and the norm cannot be restored; on the tiny test models that
step took the polynomial residual from 0.86 to 31 (J's condition number ~300).  The damping μ keeps
the step where the linearisation holds, the C_x metric makes it corpus-cheap, the sphere makes it
reachable.  What is left unmet stays in the residual for the later units of the edit.
Solve: Q = polar(λ·C_x + Σ x*·xᵀ) — keep the current inputs in place, λ‖Q·X0 − X0‖², and move the
edit keys.  C_x is the distribution of this layer's FFN inputs, which its own input-side rotations do
not change: the retention matrix needs no update after an edit.  λ = ``effective_lam`` with
d = d_model.

Remainder.  Per edit: ‖ΔMLP_true − ΔMLP_p‖ / ‖resid‖ at the edit keys — the change of the exact FFN
output, MLP(Q·x) − MLP(x), minus the change the polynomial model predicts, MLP_p(Q·x) − MLP_p(x) —
in the edit's layer record (``poly_remainder``), so a run's journal accumulates it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..hf.arch import MLPWeights
from .base import Option, Rule, UpdateResult, layer_tensors, positive
from .mose_attn import lam_options, tangent_step
from .mose_input import PREIMAGE_RIDGE
from .rotation import RetentionOperator, Rotation, effective_lam, solve_polar, weighted


def _int_in(lo, hi):
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


@dataclass
class Polynomial:
    """p(x) = Σ_k coef[k]·(x/scale)^k (float64)."""
    coef: torch.Tensor
    scale: float

    @property
    def degree(self) -> int:
        return len(self.coef) - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = x / self.scale
        c = self.coef.to(x)
        y = torch.full_like(t, float(c[-1]))
        for k in range(self.degree - 1, -1, -1):
            y = y * t + c[k]
        return y

    def deriv(self, x: torch.Tensor) -> torch.Tensor:
        if self.degree == 0:
            return torch.zeros_like(x)
        d = Polynomial(self.coef[1:] * torch.arange(1, self.degree + 1, dtype=self.coef.dtype), self.scale)
        return d(x) / self.scale


def fit_polynomial(points: torch.Tensor, counts: torch.Tensor, act, degree: int) -> tuple[Polynomial, float]:
    """The weighted least-squares polynomial of ``degree`` to ``act`` at ``points`` (bin means of
    the pre-activation histogram) with weights ``counts``; and its relative error
    RMS(act − p)/RMS(act) over that distribution."""
    x = points.to("cpu", torch.float64).reshape(-1)         # on the host: lstsq's gelsd driver is CPU-only
    w = counts.to(x).reshape(-1)
    with torch.no_grad():
        y = act(x).to(torch.float64)
    scale = float(x.abs().max()) or 1.0
    V = (x / scale)[:, None] ** torch.arange(degree + 1, dtype=x.dtype)
    sw = (w / w.sum()).sqrt()
    A = V * sw[:, None]
    norms = A.norm(dim=0).clamp_min(torch.finfo(x.dtype).tiny)
    c = torch.linalg.lstsq(A / norms, (y * sw)[:, None], driver="gelsd").solution[:, 0] / norms
    p = Polynomial(c, scale)
    err = float(((w * (y - p(x)) ** 2).sum() / (w * y ** 2).sum().clamp_min(torch.finfo(x.dtype).tiny)).sqrt())
    return p, err


# --- the FFN, exact and polynomial, on float64 copies --------------------------------------------

@dataclass
class FFN64:
    ins: list[torch.Tensor]
    in_biases: list[torch.Tensor | None]
    out: torch.Tensor
    act: object

    @classmethod
    def of(cls, W: MLPWeights) -> "FFN64":
        f = (lambda t: None if t is None else t.detach().to(torch.float64).clone())
        return cls([f(w) for w in W.ins], [f(b) for b in W.in_biases], f(W.out), W.act)

    @property
    def gated(self) -> bool:
        return len(self.ins) == 2

    def pre(self, X: torch.Tensor) -> list[torch.Tensor]:
        return [W @ X + (0.0 if b is None else b[:, None]) for W, b in zip(self.ins, self.in_biases)]

    def __call__(self, X: torch.Tensor, poly: Polynomial | None = None) -> torch.Tensor:
        """The FFN output at the columns of X (without the output bias): exact, or with ``poly``."""
        pre = self.pre(X)
        f = poly if poly is not None else (lambda t: self.act(t).to(torch.float64))
        h = f(pre[0]) * pre[1] if self.gated else f(pre[0])
        return self.out @ h

    def jacobian(self, x: torch.Tensor, poly: Polynomial) -> torch.Tensor:
        """∂MLP_p/∂x at one input x (d_model)."""
        pre = self.pre(x[:, None])
        g = pre[0][:, 0]
        if self.gated:
            u = pre[1][:, 0]
            inner = (poly.deriv(g) * u)[:, None] * self.ins[0] + poly(g)[:, None] * self.ins[1]
        else:
            inner = poly.deriv(g)[:, None] * self.ins[0]
        return self.out @ inner


def polynomial_targets(ffn: FFN64, poly: Polynomial, X: torch.Tensor, resid: torch.Tensor, chol: torch.Tensor,
                       steps: int, ridge: float) -> torch.Tensor:
    """X* (d × n): damped Gauss–Newton on the sphere towards MLP_p(x*) = MLP_p(x) + resid per column
    (module doc); ``chol`` the Cholesky factor L of C_x."""
    target = ffn(X, poly) + resid
    out = X.clone()
    one_block = torch.zeros(X.shape[0], dtype=torch.long)          # the whole x: tangent to its sphere
    for r in range(X.shape[1]):
        x, T = X[:, r:r + 1], target[:, r:r + 1]
        radius = x.norm()
        err = float((T - ffn(x, poly)).norm())
        for _ in range(steps):
            d = tangent_step(ffn.jacobian(x[:, 0], poly), (T - ffn(x, poly))[:, 0], x[:, 0], one_block, 1,
                             ridge, chol)[:, None]
            if not bool(d.any()):
                break
            for _ in range(7):
                xn = (x + d) * (radius / (x + d).norm())
                errn = float((T - ffn(xn, poly)).norm())
                if errn < err:
                    break
                d = d / 2
            else:
                break
            x, err = xn, errn
        out[:, r:r + 1] = x
    return out


@dataclass
class FFNInputRecord:
    rotation: Rotation          # Q, on the host


@dataclass
class FFNInputResult(UpdateResult):
    poly_remainder: float = float("nan")    # ‖ΔMLP_true − ΔMLP_p‖ / ‖resid‖ at the edit keys


class MOSEFFNInputRule(Rule):
    """mlp.in: W_gate, W_up (or W_in) ← ·Q with Q from the polynomial expansion (module doc).
    State per layer: C_x (d_model × d_model float64) and the fitted polynomial."""
    name = "mose"
    module = "mlp.in"
    supports_edit_weights = True
    OPTIONS = lam_options({
        "poly_degree": Option(3, "degree of the activation's polynomial, an integer 1 … 15", _int_in(1, 15)),
        "gn_steps": Option(3, "Gauss–Newton steps of the key targets, an integer 1 … 50", _int_in(1, 50)),
        "gn_ridge": Option(1e-2, "damping μ of the Gauss–Newton steps relative to σ_max², > 0", positive),
    })

    def __init__(self, default_lam: float, default_lam_unit: str = "absolute", polar_method: str = "auto",
                 solve_dtype: torch.dtype = torch.float64, **hparams):
        opts = self.check_options(hparams, f"module_hparams[{self.module!r}]")
        lam = default_lam if opts["lam"] is None else opts["lam"]
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"MOSE λ must be ≥ 0, got {lam!r}")
        self.lam = float(lam)
        self.lam_unit = opts["lam_unit"] or default_lam_unit
        self.degree, self.steps, self.ridge = opts["poly_degree"], opts["gn_steps"], opts["gn_ridge"]
        self.polar_method, self.solve_dtype = polar_method, solve_dtype
        self.cx: dict[int, torch.Tensor] = {}
        self.chol: dict[int, torch.Tensor] = {}
        self.poly: dict[int, Polynomial] = {}
        self.fit_error: dict[int, float] = {}

    def prepare(self, layer: int, W: MLPWeights, C0: dict) -> None:
        device = W.out.device
        if layer not in self.cx:
            C = C0["Cx"].to(device, torch.float64)
            self.cx[layer] = 0.5 * (C + C.T)
        else:
            self.cx[layer] = self.cx[layer].to(device, torch.float64)
        if layer not in self.poly:
            self.poly[layer], self.fit_error[layer] = fit_polynomial(C0["hist_means"], C0["hist_counts"], W.act,
                                                                     self.degree)
        C = self.cx[layer]
        ridge = PREIMAGE_RIDGE * float(torch.trace(C)) / C.shape[0]
        self.chol[layer] = torch.linalg.cholesky(C + ridge * torch.eye(C.shape[0], dtype=C.dtype, device=device))

    def lam_for(self, layer: int) -> float:
        return effective_lam(self.lam, self.lam_unit, self.cx[layer].shape[0])

    def update(self, layer: int, W: MLPWeights, K: torch.Tensor, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> FFNInputResult:
        t = time.perf_counter()
        X = K.to(W.out.device, torch.float64)
        if X.shape[0] != W.ins[0].shape[1] or resid.shape != (W.out.shape[0], X.shape[1]):
            raise ValueError(f"mlp.in at layer {layer}: keys must be d_model × n and the residual d_model × n; "
                             f"got {tuple(X.shape)} and {tuple(resid.shape)}")
        resid = resid.to(X)
        for name, x in (("keys", X), ("residual", resid)):
            if not torch.isfinite(x).all():
                raise ValueError(f"non-finite {name} at layer {layer}; refusing to rotate")
        ffn, poly = FFN64.of(W), self.poly[layer]
        target = polynomial_targets(ffn, poly, X, resid, self.chol[layer], self.steps, self.ridge)
        lam = self.lam_for(layer)
        P = RetentionOperator(self.cx[layer], lam)
        solved, rot = solve_polar(P, *weighted(X, target, edit_weights), self.polar_method, self.solve_dtype,
                                  P.trace())
        QX = rot.left(X)
        d_true = ffn(QX) - ffn(X)
        d_poly = ffn(QX, poly) - ffn(X, poly)
        remainder = float((d_true - d_poly).norm() / resid.norm().clamp_min(torch.finfo(X.dtype).tiny))
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            for Win in W.ins:
                rot.apply_right_(Win)
        if W.out.is_cuda:
            torch.cuda.synchronize(W.out.device)
        return FFNInputResult(objective=solved.objective, objective_identity=solved.objective_identity,
                              orth_error=solved.orth_error, undo=FFNInputRecord(rot.to("cpu")),
                              seconds_solve=t_solve, seconds_apply=time.perf_counter() - t,
                              poly_remainder=remainder)

    # C_x does not change under this layer's input rotations: nothing to fold in or take out
    def commit(self, layer: int, record: FFNInputRecord) -> None:
        pass

    def undo(self, layer: int, record: FFNInputRecord) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"C.{l}": c for l, c in self.cx.items()}
        for l, p in self.poly.items():
            out[f"coef.{l}"] = p.coef
            out[f"scale.{l}"] = torch.tensor(p.scale, dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith(("C.", "coef.", "scale."))]
        if unknown:
            raise ValueError(f"not a MOSE mlp.in state: {unknown}")
        self.cx = layer_tensors(state, "C")
        scales = layer_tensors(state, "scale")
        self.poly = {l: Polynomial(c.to(torch.float64), float(scales[l]))
                     for l, c in layer_tensors(state, "coef").items()}
