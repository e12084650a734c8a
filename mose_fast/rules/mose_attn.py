"""MOSE on attention: V rotated per key/value head, Q and K rotated together by one orthogonal map.

Notation.  A layer has H query heads and H_kv key/value heads of ``head_dim`` = hd dims; with
grouped-query attention (GQA, G = H/H_kv) query head h = g·G + s attends with kv head g — ``s`` is
the head's *slot* in its group (HF ``repeat_kv``).  The kv space is concat_g (dim d_kv = H_kv·hd),
u = concat_h o_h is the input of the output projection W_o (dim d_q = H·hd), a^h_j the attention
weights of head h at the edited position over the positions j ≤ p.

attn.v — W_v ← R·W_v (b_v ← R·b_v), R = ⊕_g R_g block-diagonal over the kv heads, R_g ∈ O(hd)
------------------------------------------------------------------------------------------------
Values enter the output only through the weighted sums  o_h = Σ_j a^h_j v_{j,g(h)}  (the weights
a^h_j depend on Q and K only).  With v_j ↦ R·v_j:

    o'_h = Σ_j a^h_j (R·v_j)_{g(h)} = R_{g(h)}·Σ_j a^h_j v_{j,g(h)} = R_{g(h)}·o_h   ⇒   u' = R̃·u,
    R̃ = ⊕_h R_{g(h)}  (d_q × d_q),   attention output  W_o·u' = W_o·R̃·u.

So rotating V is an input-side rotation of W_o with block structure: each query head's slice is
turned by its kv head's R_g.  The second equality needs (R·v)_g to depend on v_g alone: a rotation
that mixed kv heads would put Σ_j a^h_j v_{j,g'} with head h's weights into slot g, which is no
function of u — only block-diagonal R factors this way.  ‖W_v‖_F and every singular value of W_v
stay (R orthogonal on the left), W_o is untouched.

Keys: u at the subject's last token, averaged over the context templates (MEMIT's mean key).
Targets: a corpus-cheap u* with W_o·u* ≈ W_o·u + resid that R̃ can reach.  R̃ keeps the norm of
every head slice, so the shift d = u* − u is taken tangent to each head's sphere (u_hᵀ·d_h = 0 for
every h) and cheap under P = E[u uᵀ] over corpus tokens (+ a ridge of 1e-8 of its mean eigenvalue,
as in mose_input.py):

    d = argmin ‖W_o·d − resid‖² + μ·dᵀP d   subject to  u_hᵀ·d_h = 0 (all h),
    μ = ``ridge`` (default 1e-2) · σ_max(W_o·L⁻ᵀ·Π)²            (P = L·Lᵀ, Π the tangent projector),

then each head slice of u + d rescaled to ‖u_h‖ (a second-order correction).  Why not the exact
cheapest preimage P⁻¹W_oᵀ(W_oP⁻¹W_oᵀ)⁻¹·resid followed by the rescale: that preimage puts much of
its mass along the heads' own directions, which R̃ cannot change, and dropping them afterwards
breaks the cancellation between heads, and the attention output then moves far from the residual
(docs/research.md, "Attention and FFN-input rotations", has the comparison).  What is left unmet
stays in the residual for the later units.
Solve: the retention term keeps the current model's o_proj inputs in place,
λ‖R̃·U0 − U0‖², which per kv head reads 2λ·(tr S_g − tr(R_gᵀ·S_g)) with S_g = Σ_{h∈g} P[h,h]; with
the edit term Σ‖R̃·u − u*‖² the problem separates over g:

    R_g = polar(λ·S_g + Σ_{h∈g} Σ_requests u*_h·u_hᵀ).

P follows the current model: P ← R̃·P·R̃ᵀ when an edit is kept.  λ = ``effective_lam`` with the
width d = d_kv.

attn.qk — one R ∈ O(d_kv): W_k ← R·W_k (b_k ← R·b_k) and W_q ← (R ⊗ I_G)·W_q (b_q likewise)
------------------------------------------------------------------------------------------------
Lifting.  Write q_s = (q_{(0,s)}, …, q_{(H_kv−1,s)}) ∈ R^{d_kv} for the query heads of slot s; the
lifted map applies R to every q_s (that is R ⊗ I_G in the slot-major order; in HF's head order it
is the same map with rows permuted).  Then for every pair of positions (a, b) and every slot s

    Σ_g score_{(g,s)}(a, b) = Σ_g ⟨q_{(g,s)}(a), k_g(b)⟩ = ⟨q_s(a), k(b)⟩
                           ↦ ⟨R·q_s(a), R·k(b)⟩ = ⟨q_s(a), k(b)⟩                 (RᵀR = I),

so the slot's summed score is preserved exactly (before the rotary map; see below for with it),
while the individual heads' scores change unless R is block-diagonal per head — and a per-head R
(R_g on q_(g,s) and k_g alike) preserves every score, hence changes nothing at all.  The edit works
through R's mixing of heads; it is an approximation with respect to the per-head softmax: unrelated
attention is kept as far as the retention term keeps corpus queries and keys in place, not exactly.

Rotary map (RoPE).  At position p the rotary map Θ_p multiplies, in every head alike, pair i of
dims (rotate_half: dims i and i + rot/2; GPT-J rotate_every_two: dims 2i and 2i + 1), read as one
complex number z = x_a + i·x_b, by e^{iθ_i p}; dims ≥ rot pass through.  Scores are
⟨Θ_a q, Θ_b k⟩, so R keeps them (per slot, as above) iff R·Θ_p = Θ_p·R for every p.  Which R do:

* Θ_p is, on the subspace E_i spanned by pair i in all H_kv heads (real dim 2·H_kv), the rotation
  cos(θ_i p)·I + sin(θ_i p)·J (J the complex structure z ↦ i·z), and the identity on the pass-
  through dims E_0.  The θ_i are distinct and non-zero, so for generic p the eigenvalues
  e^{±iθ_i p} and 1 of the different subspaces differ and anything commuting with every Θ_p maps
  each E_i into itself and E_0 into itself;
* on E_i, commuting with cos·I + sin·J for a p with sin(θ_i p) ≠ 0 is commuting with J, i.e. being
  complex-linear on (z_{g,i})_g ∈ C^{H_kv}; an orthogonal complex-linear map is unitary.

So R = ⊕_i U_i ⊕ O_pass, U_i ∈ U(H_kv) acting on (x_{g,a_i} + i·x_{g,b_i})_g, O_pass ∈ O(H_kv·(hd − rot))
any orthogonal map of the pass-through dims (partial rotary: GPT-J ``rotary_dim``, GPT-NeoX
``rotary_pct``); with no rotary map (GPT-2) R ∈ O(d_kv) is free.  (If two pairs shared a frequency
their mixing would commute too; this class is then a subset of the commutant — still exact.)
For such R, Θ_a·R = R·Θ_a, so  ⟨Θ_a R q, Θ_b R k⟩ = ⟨R Θ_a q, R Θ_b k⟩ = ⟨Θ_a q, Θ_b k⟩  slot-summed.

Structured polar.  The solve maximises tr(Rᵀ·M) over that class, M = λ·C + Σ q*·qᵀ (below).  It
splits into tr(U-part on each E_i) + tr(O_passᵀ·M_pass).  On E_i, in the real basis (re_g, im_g)
a complex U = A + iB is the real map [[A, −B], [B, A]], and with M_i = [[M_rr, M_ri], [M_ir, M_ii]]

    tr([[A, −B], [B, A]]ᵀ·M_i) = tr(Aᵀ(M_rr + M_ii)) + tr(Bᵀ(M_ir − M_ri)) = Re tr(Uᴴ·N_i),
    N_i = (M_rr + M_ii) + i·(M_ir − M_ri),

whose maximiser over U(H_kv) is U_i = U·Vᴴ from the complex SVD N_i = U·Σ·Vᴴ.  Equivalently: for a
real R commuting with J, tr(Rᵀ M) = tr(Rᵀ M̄) with M̄ = (M + JᵀMJ)/2 — the average of M and its
J-conjugate, the best complex-linear approximation of M, which is the real form of N_i/2.  The pass
block is an ordinary real polar.  R is orthogonal to rounding (≈1e-15) and commutes with Θ_p.

Keys and targets (closed form).  Keys: the query slots at the subject's last token (pre-rotary;
averaged over templates).  Target: one Gauss–Newton step on the attention output at that position
with the context keys and values held fixed.  With a^h = softmax_j(c·⟨Θ_p q_h, k̃_j⟩) (c the score
scale, k̃_j = Θ_j k_{j,g(h)}) and o_h = Σ_j a^h_j v_j,

    ∂o_h/∂q_h = J_h = c·Σ_j a^h_j (v_j − o_h)·(Θ_pᵀ k̃_j)ᵀ              (softmax Jacobian; hd × hd),

J = ⊕_h J_h, and Δq = argmin ‖W_o·J·Δq − resid‖² + ρ‖Δq‖² with A = W_o·J and
ρ = ``ridge`` × σ_max(A·Π)² (default 1e-3: J has rank ≤ min(hd, p) per head, the ridge keeps Δq off
the directions the output barely feels), Δq taken — as for attn.v — tangent to the sphere of each
(slot, pair index) block of q and of each slot's pass-through block (R keeps those norms; Π the
tangent projector); q* = q + Δq with each block rescaled to its norm in q.
Retention keeps corpus queries AND keys in place: λ‖R·K0 − K0‖² + λΣ_s‖R·Q_s0 − Q_s0‖², i.e.
C = E[k kᵀ] + Σ_s E[q_s q_sᵀ] in the kv space (q, k the q_proj/k_proj outputs before the rotary map,
whose norms it keeps anyway); C follows the current model, C ← R·C·Rᵀ when an edit is kept.
λ = ``effective_lam`` with d = d_kv.

Approximations, stated: J is a one-step linearisation; R also moves the context keys (and, through
them, the scores J assumed fixed), and the per-head softmax sees only what R does to each head; the
retention term holds the corpus queries and keys, not the attention patterns.  The key movement is
of the same order as the query's: a rotation acting on one kv head alone (a phase per pair, a turn
of the pass-through dims) moves q and k together and changes no score at all, yet it is as good as
any other for fitting q*, so attn.qk's own output change follows its residual less closely than
attn.v's (docs/research.md).  Solving for R in its Lie algebra with the keys' motion linearised as
well is the natural refinement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..hf.arch import AttnGeometry, AttnWeights, apply_rotary
from ..solve.procrustes import objective, orthogonality_error
from .base import Option, Rule, UpdateResult, layer_tensors, non_negative, positive
from .rotation import LAM_UNITS, effective_lam, weighted

# C_u (attn.v) has eigenvalues down to ~0 in a trained model; the preimage solve adds this ridge
# (relative to its mean eigenvalue), as the input-side rule does for C0.
PREIMAGE_RIDGE = 1e-8
# The polar factor of a matrix with exactly zero singular values is not unique; an identity nudge
# of this size (relative to ‖M‖_F) picks R = I on such directions and moves nothing else measurably.
POLAR_NUDGE = 1e-13


def lam_options(extra: dict | None = None) -> dict[str, Option]:
    opts = {
        "lam": Option(None, "λ of this module's rule, ≥ 0 (None: MOSEConfig.lam)",
                      lambda x: x is None or non_negative(x)),
        "lam_unit": Option(None, "'absolute' or 'per_dim' (None: as rule_hparams.lam_unit, else 'absolute')",
                           lambda x: x is None or x in LAM_UNITS),
    }
    opts.update(extra or {})
    return opts


def polar(M: torch.Tensor) -> torch.Tensor:
    """U·Vᴴ of M (real or complex), with the identity nudge for exactly singular M."""
    nudge = POLAR_NUDGE * float(torch.linalg.matrix_norm(M))
    U, _, Vh = torch.linalg.svd(M + nudge * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
    return U @ Vh


# --- the rotary map's commutant ---------------------------------------------------------------------

def kv_pair_indices(geom: AttnGeometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices into the kv space (g·hd + e): re (rot/2 × H_kv) and im (rot/2 × H_kv) for each pair
    index i, and the pass-through dims (all heads)."""
    a, b = geom.pair_dims()
    heads = torch.arange(geom.n_kv)[None, :] * geom.head_dim
    re, im = a[:, None] + heads, b[:, None] + heads
    pas = (torch.arange(geom.n_kv)[:, None] * geom.head_dim + geom.pass_dims()[None, :]).reshape(-1)
    return re, im, pas


def structured_polar(M: torch.Tensor, geom: AttnGeometry) -> torch.Tensor:
    """argmax tr(Rᵀ·M) over R ∈ O(d_kv) commuting with the rotary map (see the module doc):
    ⊕_i U_i (complex polar of N_i = (M_rr + M_ii) + i(M_ir − M_ri)) ⊕ polar(M_pass)."""
    M = M.to(torch.float64)
    if geom.rot == 0:
        return polar(M)
    R = torch.zeros_like(M)
    re, im, pas = kv_pair_indices(geom)
    for r, i in zip(re, im):
        Mrr, Mri, Mir, Mii = M[r][:, r], M[r][:, i], M[i][:, r], M[i][:, i]
        U = polar(torch.complex(Mrr + Mii, Mir - Mri))
        A, B = U.real, U.imag
        R[r[:, None], r[None, :]] = A
        R[r[:, None], i[None, :]] = -B
        R[i[:, None], r[None, :]] = B
        R[i[:, None], i[None, :]] = A
    if len(pas):
        R[pas[:, None], pas[None, :]] = polar(M[pas][:, pas])
    return R


def random_structured_rotation(geom: AttnGeometry, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random R from the class structured_polar returns (Haar on each factor): for tests."""
    def haar(n, complex_=False):
        dt = torch.complex128 if complex_ else torch.float64
        X = torch.randn(n, n, dtype=dt, generator=generator)
        Q, Rr = torch.linalg.qr(X)
        d = torch.diagonal(Rr)
        return Q * (d / d.abs())[None, :]
    d = geom.d_kv
    if geom.rot == 0:
        return haar(d)
    R = torch.zeros(d, d, dtype=torch.float64)
    re, im, pas = kv_pair_indices(geom)
    for r, i in zip(re, im):
        U = haar(geom.n_kv, True)
        R[r[:, None], r[None, :]] = U.real
        R[r[:, None], i[None, :]] = -U.imag
        R[i[:, None], r[None, :]] = U.imag
        R[i[:, None], i[None, :]] = U.real
    if len(pas):
        R[pas[:, None], pas[None, :]] = haar(len(pas))
    return R


# --- layouts: q (head order) ↔ slots in the kv space ------------------------------------------------

def q_to_slots(x: torch.Tensor, geom: AttnGeometry) -> torch.Tensor:
    """(d_q × n) in head order h = g·G + s → (d_kv × G·n): column s·n + r is request r's slot s."""
    n = x.shape[1]
    return (x.reshape(geom.n_kv, geom.groups, geom.head_dim, n).permute(0, 2, 1, 3)
            .reshape(geom.d_kv, geom.groups * n))


def lift_q(R: torch.Tensor, geom: AttnGeometry) -> torch.Tensor:
    """R ⊗ I_G in q's head order (d_q × d_q): row (g·G + s, e) ← Σ R[(g,e),(g',e')] q[(g'·G + s, e')]."""
    G, hd, Hkv = geom.groups, geom.head_dim, geom.n_kv
    R4 = R.reshape(Hkv, hd, Hkv, hd)
    L = torch.zeros(Hkv, G, hd, Hkv, G, hd, dtype=R.dtype, device=R.device)
    for s in range(G):
        L[:, s, :, :, s, :] = R4
    return L.reshape(geom.d_q, geom.d_q)


def rotate_heads_(W: torch.Tensor, R: torch.Tensor, geom: AttnGeometry, which: str) -> None:
    """In place on a per-head view W (heads × hd [× d_model]): k/v rows ← R·rows (R d_kv × d_kv or
    a stack H_kv × hd × hd of per-head blocks), q rows ← (R ⊗ I_G)·rows.  Float64 product, one
    rounding to W's dtype."""
    tail = W.shape[2:]
    X = W.to(torch.float64)
    R = R.to(X.device, torch.float64)
    if R.dim() == 3:                                   # per kv head (attn.v): heads × hd × hd
        Y = torch.einsum("gab,gb...->ga...", R, X)
    elif which == "q":
        Xs = X.reshape(geom.n_kv, geom.groups, geom.head_dim, *tail).transpose(0, 1)
        Xs = Xs.reshape(geom.groups, geom.d_kv, *tail)
        Ys = torch.einsum("ab,sb...->sa...", R, Xs)
        Y = Ys.reshape(geom.groups, geom.n_kv, geom.head_dim, *tail).transpose(0, 1).reshape(W.shape)
    else:
        Y = torch.einsum("ab,b...->a...", R, X.reshape(geom.d_kv, *tail)).reshape(W.shape)
    with torch.no_grad():
        W.copy_(Y.to(W.dtype))


def block_diag_heads(Rg: torch.Tensor, geom: AttnGeometry) -> torch.Tensor:
    """R̃ = ⊕_h R_{g(h)} (d_q × d_q) from the kv heads' blocks (H_kv × hd × hd)."""
    return torch.block_diag(*Rg.repeat_interleave(geom.groups, dim=0))


def rescale_blocks(target: torch.Tensor, ref: torch.Tensor, block_of: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Each column's blocks (``block_of[d]`` names row d's block) of ``target`` rescaled to their
    norms in ``ref`` (a block of ``target`` that is zero is left as it is)."""
    def norms(x):
        return torch.zeros(n_blocks, x.shape[1], dtype=x.dtype, device=x.device).index_add_(
            0, block_of.to(x.device), x.pow(2)).sqrt()
    t, r = norms(target), norms(ref)
    scale = torch.where(t > 0, r / t.clamp_min(torch.finfo(t.dtype).tiny), torch.ones_like(t))
    return target * scale[block_of.to(target.device)]


def slot_blocks(geom: AttnGeometry) -> tuple[torch.Tensor, int]:
    """block_of for kv-space slot vectors: pair index i for its re/im dims of every head, one more
    block for all pass-through dims; with no rotary map, one block."""
    if geom.rot == 0:
        return torch.zeros(geom.d_kv, dtype=torch.long), 1
    per_dim = torch.full((geom.head_dim,), geom.rot // 2, dtype=torch.long)
    a, b = geom.pair_dims()
    per_dim[a] = torch.arange(geom.rot // 2)
    per_dim[b] = torch.arange(geom.rot // 2)
    n = geom.rot // 2 + (1 if geom.rot < geom.head_dim else 0)
    return per_dim.repeat(geom.n_kv), n


# --- the attention at one position, and its Jacobian ------------------------------------------------

def attention_at(q_p: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 geom: AttnGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, J) at the last of T positions, causal: q_p (H × hd) the pre-rotary query there, k, v
    (T × H_kv × hd) pre-rotary keys and values at positions 0 … T−1, cos/sin (T × rot/2).  o
    (H × hd) the heads' outputs, J (H × hd × hd) = ∂o_h/∂q_h (see the module doc).  Float64."""
    q_p, k, v = q_p.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    T = k.shape[0]
    kt = apply_rotary(k, cos[:T], sin[:T], geom).repeat_interleave(geom.groups, dim=1)     # T × H × hd
    qt = apply_rotary(q_p[None], cos[T - 1:T], sin[T - 1:T], geom)[0]                      # H × hd
    vh = v.repeat_interleave(geom.groups, dim=1)
    a = torch.softmax(geom.scaling * torch.einsum("hd,jhd->hj", qt, kt), dim=-1)          # H × T
    o = torch.einsum("hj,jhd->hd", a, vh)
    back = apply_rotary(kt, cos[T - 1:T].expand(T, -1), -sin[T - 1:T].expand(T, -1), geom)  # Θ_pᵀ·k̃_j
    J = geom.scaling * torch.einsum("hj,jhd,jhe->hde", a, vh - o[None], back)
    return o, J


@dataclass
class QKKeys:
    """The attn.qk unit's keys for n requests: q (d_q × n) pre-rotary queries at the subject's last
    token and J (n × H × hd × hd) the per-head Jacobians of the attention output there (both
    averaged over the context templates); ``mismatch``: the largest relative difference between
    the recomputed attention output and the model's (a check on the recomputation)."""
    q: torch.Tensor
    J: torch.Tensor
    mismatch: float = 0.0


def q_blocks(geom: AttnGeometry) -> tuple[torch.Tensor, int]:
    """block_of for q in head order: the (slot, pair index) blocks and each slot's pass block."""
    per_slot, nb = slot_blocks(geom)                                   # over the kv-space index (g, e)
    blocks = per_slot.view(geom.n_kv, 1, geom.head_dim) + nb * torch.arange(geom.groups).view(1, -1, 1)
    return blocks.reshape(-1), nb * geom.groups


def qk_targets(q: torch.Tensor, J: torch.Tensor, Wo: torch.Tensor, resid: torch.Tensor, geom: AttnGeometry,
               ridge: float, rescale: bool = True) -> torch.Tensor:
    """q* (d_q × n): one ridge-regularised Gauss–Newton step of W_o·J·Δq = resid per request, taken
    tangent to the sphere of every (slot, pair) block of q, then each block rescaled to its norm in
    q (``rescale``)."""
    Wo3 = Wo.to(torch.float64).reshape(Wo.shape[0], geom.n_heads, geom.head_dim)
    out = q.clone()
    block_of, nb = q_blocks(geom)
    for r in range(q.shape[1]):
        A = torch.einsum("mhd,hde->mhe", Wo3, J[r].to(Wo3)).reshape(Wo.shape[0], geom.d_q)
        out[:, r] += tangent_step(A, resid[:, r], q[:, r], block_of, nb, ridge)
    if rescale:
        out = rescale_blocks(out, q, block_of, nb)
    return out


def tangent_step(A: torch.Tensor, r: torch.Tensor, ref: torch.Tensor, block_of: torch.Tensor, n_blocks: int,
                 ridge: float, chol: torch.Tensor | None = None) -> torch.Tensor:
    """d (one column) minimising ‖A·d − r‖² + μ·dᵀC·d subject to ref_bᵀ·d_b = 0 for every block b
    (d tangent to the sphere of each block of ``ref``): C = L·Lᵀ from ``chol`` (the identity without
    it), μ = ``ridge``·σ_max(A·L⁻ᵀ·Π)², Π the projector onto the constraints' complement in the
    whitened coordinates e = Lᵀ·d.  A: m × n, r: m, ref: n."""
    n = A.shape[1]
    rows = block_of.to(ref.device)
    Cm = torch.zeros(n, n_blocks, dtype=ref.dtype, device=ref.device)
    Cm[torch.arange(n, device=ref.device), rows] = ref
    Aw = A
    if chol is not None:
        Aw = torch.linalg.solve_triangular(chol, A.T, upper=False).T           # A·L⁻ᵀ
        Cm = torch.linalg.solve_triangular(chol, Cm, upper=False)             # the constraints, whitened
    Cm = Cm[:, Cm.norm(dim=0) > 0]
    Q = torch.linalg.qr(Cm)[0] if Cm.shape[1] else Cm
    B = Aw - (Aw @ Q) @ Q.T
    mu = ridge * float(torch.linalg.matrix_norm(B, ord=2)) ** 2
    if not mu > 0:
        return torch.zeros(n, dtype=A.dtype, device=A.device)
    e = torch.linalg.solve(B.T @ B + mu * torch.eye(n, dtype=A.dtype, device=A.device), B.T @ r)
    return e if chol is None else torch.linalg.solve_triangular(chol.T, e[:, None], upper=True)[:, 0]


def _check_finite(layer, **xs):
    for name, x in xs.items():
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite {name} at layer {layer}; refusing to rotate")


@dataclass
class AttnRecord:
    R: torch.Tensor             # attn.qk: d_kv × d_kv; attn.v: H_kv × hd × hd (host, float64)


class _AttnRule(Rule):
    name = "mose"
    supports_edit_weights = True
    module = ""

    def __init__(self, default_lam: float, default_lam_unit: str = "absolute", **hparams):
        """``default_lam`` / ``default_lam_unit``: MOSEConfig.lam and rule_hparams' lam_unit, used
        unless the options ``lam`` / ``lam_unit`` (module_hparams) say otherwise."""
        opts = type(self).check_options(hparams, f"module_hparams[{self.module!r}]")
        self.opts = opts
        lam = default_lam if opts["lam"] is None else opts["lam"]
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"MOSE λ must be ≥ 0, got {lam!r}")
        self.lam = float(lam)
        self.lam_unit = opts["lam_unit"] or default_lam_unit
        self.gram: dict[int, torch.Tensor] = {}

    def lam_for(self, geom: AttnGeometry) -> float:
        return effective_lam(self.lam, self.lam_unit, geom.d_kv)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"P.{l}": p for l, p in self.gram.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = [k for k in state if not k.startswith("P.")]
        if unknown:
            raise ValueError(f"not a MOSE {self.module} state: {unknown}")
        self.gram = layer_tensors(state, "P")


def v_targets(U: torch.Tensor, Wo: torch.Tensor, resid: torch.Tensor, P: torch.Tensor, geom: AttnGeometry,
              ridge: float) -> torch.Tensor:
    """u* (d_q × n): per request the P-cheap step W_o·d ≈ resid tangent to every head's sphere, then
    each head slice rescaled to ‖u_h‖ (module doc)."""
    Wo = Wo.to(torch.float64)
    chol = torch.linalg.cholesky(P + PREIMAGE_RIDGE * float(torch.trace(P)) / P.shape[0]
                                 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device))
    heads = torch.arange(geom.n_heads).repeat_interleave(geom.head_dim)
    out = U.clone()
    for r in range(U.shape[1]):
        out[:, r] += tangent_step(Wo, resid[:, r], U[:, r], heads, geom.n_heads, ridge, chol)
    return rescale_blocks(out, U, heads, geom.n_heads)


class MOSEAttnVRule(_AttnRule):
    """attn.v: W_v ← R·W_v with R = ⊕_g R_g over the kv heads (module doc).  State: P = E[u uᵀ]
    (d_q × d_q float64, the o_proj input second moment) following the current model."""
    module = "attn.v"
    OPTIONS = lam_options({
        "ridge": Option(1e-2, "damping μ of the target step relative to σ_max², > 0", positive),
    })

    def prepare(self, layer: int, W: AttnWeights, C0: dict) -> None:
        if layer in self.gram:
            self.gram[layer] = self.gram[layer].to(W.o.device, torch.float64)
            return
        P = C0["Cu"].to(W.o.device, torch.float64)
        self.gram[layer] = 0.5 * (P + P.T)

    def update(self, layer: int, W: AttnWeights, K: torch.Tensor, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> UpdateResult:
        t = time.perf_counter()
        g = W.geom
        U = K.to(W.o.device, torch.float64)                     # d_q × n
        if U.shape[0] != g.d_q or resid.shape != (W.o.shape[0], U.shape[1]):
            raise ValueError(f"attn.v at layer {layer}: keys must be d_q × n = {g.d_q} × n and the residual "
                             f"d_model × n; got {tuple(U.shape)} and {tuple(resid.shape)}")
        resid = resid.to(U)
        _check_finite(layer, keys=U, residual=resid)
        P = self.gram[layer]
        target = v_targets(U, W.o, resid, P, g, self.opts["ridge"])
        A, V = weighted(U, target, edit_weights)
        lam = self.lam_for(g)
        hd, G = g.head_dim, g.groups
        Pd = P.reshape(g.n_heads, hd, g.n_heads, hd)
        S = torch.stack([Pd[h, :, h, :] for h in range(g.n_heads)]).reshape(g.n_kv, G, hd, hd).sum(1)
        Ah = A.reshape(g.n_kv, G, hd, -1)
        Vh = V.reshape(g.n_kv, G, hd, -1)
        M = lam * S + torch.einsum("gsan,gsbn->gab", Vh, Ah)
        Rg = torch.stack([polar(m) for m in M])
        Rt = block_diag_heads(Rg, g)
        solved = objective(Rt, P, A, V, lam)
        identity = objective(torch.eye(g.d_q, dtype=P.dtype, device=P.device), P, A, V, lam)
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        rotate_heads_(W.v, Rg, g, "v")
        if W.bv is not None:
            rotate_heads_(W.bv, Rg, g, "v")
        return UpdateResult(objective=solved, objective_identity=identity, orth_error=orthogonality_error(Rt),
                            undo=AttnRecord(Rg.to("cpu")), seconds_solve=t_solve,
                            seconds_apply=time.perf_counter() - t)

    def _rotate(self, layer: int, Rg: torch.Tensor) -> None:
        P = self.gram[layer]
        G = self.gram[layer].shape[0] // Rg.shape[1] // Rg.shape[0]
        Rt = torch.block_diag(*Rg.to(P).repeat_interleave(G, dim=0))
        P = Rt @ P @ Rt.T
        self.gram[layer] = 0.5 * (P + P.T)

    def commit(self, layer: int, record: AttnRecord) -> None:
        self._rotate(layer, record.R)

    def undo(self, layer: int, record: AttnRecord) -> None:
        self._rotate(layer, record.R.transpose(1, 2))


class MOSEAttnQKRule(_AttnRule):
    """attn.qk: one R ∈ O(d_kv) commuting with the rotary map on K and, lifted, on Q (module doc).
    State: C = E[k kᵀ] + Σ_s E[q_s q_sᵀ] (d_kv × d_kv float64) following the current model."""
    module = "attn.qk"
    OPTIONS = lam_options({
        "ridge": Option(1e-3, "ridge ρ of the Gauss–Newton step relative to σ_max(W_o·J)², > 0", positive),
    })

    def prepare(self, layer: int, W: AttnWeights, C0: dict) -> None:
        if layer in self.gram:
            self.gram[layer] = self.gram[layer].to(W.o.device, torch.float64)
            return
        C = C0["Cqk"].to(W.o.device, torch.float64)
        self.gram[layer] = 0.5 * (C + C.T)

    def update(self, layer: int, W: AttnWeights, K: QKKeys, resid: torch.Tensor,
               edit_weights: torch.Tensor | None = None) -> UpdateResult:
        t = time.perf_counter()
        g = W.geom
        q = K.q.to(W.o.device, torch.float64)
        if q.shape[0] != g.d_q or K.J.shape != (q.shape[1], g.n_heads, g.head_dim, g.head_dim) \
                or resid.shape != (W.o.shape[0], q.shape[1]):
            raise ValueError(f"attn.qk at layer {layer}: queries must be d_q × n = {g.d_q} × n, J n × H × hd × hd "
                             f"and the residual d_model × n; got {tuple(q.shape)}, {tuple(K.J.shape)}, "
                             f"{tuple(resid.shape)}")
        resid = resid.to(q)
        _check_finite(layer, keys=q, jacobian=K.J, residual=resid)
        target = qk_targets(q, K.J.to(q), W.o, resid, g, self.opts["ridge"])
        A, V = q_to_slots(q, g), q_to_slots(target, g)                     # d_kv × G·n
        if edit_weights is not None:
            edit_weights = torch.as_tensor(edit_weights, dtype=torch.float64).repeat(g.groups)
        A, V = weighted(A, V, edit_weights)
        lam = self.lam_for(g)
        C = self.gram[layer]
        R = structured_polar(lam * C + V @ A.T, g)
        solved = objective(R, C, A, V, lam)
        identity = objective(torch.eye(g.d_kv, dtype=C.dtype, device=C.device), C, A, V, lam)
        t_solve = time.perf_counter() - t
        t = time.perf_counter()
        rotate_heads_(W.k, R, g, "k")
        rotate_heads_(W.q, R, g, "q")
        if W.bk is not None:
            rotate_heads_(W.bk, R, g, "k")
        if W.bq is not None:
            rotate_heads_(W.bq, R, g, "q")
        return UpdateResult(objective=solved, objective_identity=identity, orth_error=orthogonality_error(R),
                            undo=AttnRecord(R.to("cpu")), seconds_solve=t_solve,
                            seconds_apply=time.perf_counter() - t)

    def _rotate(self, layer: int, R: torch.Tensor) -> None:
        C = self.gram[layer]
        R = R.to(C)
        C = R @ C @ R.T
        self.gram[layer] = 0.5 * (C + C.T)

    def commit(self, layer: int, record: AttnRecord) -> None:
        self._rotate(layer, record.R)

    def undo(self, layer: int, record: AttnRecord) -> None:
        self._rotate(layer, record.R.T)
