"""The attention rules (rules/mose_attn.py) on tiny random models of every family, float64: Q and K
get one rotation (GQA and the fused layouts included), the rotation class commutes with each
family's own rotary map and keeps every slot's summed score, a zero edit term changes nothing,
V's rotation is a block rotation of the output projection's input, the recomputed attention and
its Jacobian, and the structured polar's optimality."""
import importlib

import pytest
import torch
from test_modules import REQ, unit_editor

from mose_fast.hf.arch import AttnGeometry, attention_geometry, qkv_modules, qkv_views, split_qkv
from mose_fast.hf.hooks import capture_inputs, capture_outputs
from mose_fast.memit.keys import unit_keys_and_outputs
from mose_fast.rules.mose_attn import (
    attention_at,
    block_diag_heads,
    kv_pair_indices,
    lift_q,
    random_structured_rotation,
    rotate_heads_,
    structured_polar,
)

from helpers import FAMILIES

TEXT = "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates."


def model_rope(model, family: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The family's own rotary map (its rotary module and apply function) on x (T × heads × hd)."""
    if family == "gpt2":
        return x.clone()
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    pos = positions.view(1, -1)
    if family == "gptj":
        sin, cos = model.transformer.rotary_emb(x, pos)
        rot = 2 * sin.shape[-1]
        xr = mod.apply_rotary_pos_emb(x[None, :, :, :rot], sin, cos)[0]
        return torch.cat([xr, x[:, :, rot:]], dim=-1)
    emb = model.gpt_neox.rotary_emb if family == "gpt_neox" else model.model.rotary_emb
    cos, sin = emb(x, pos)
    xh = x.transpose(0, 1)[None]                         # 1 × heads × T × hd
    q, _ = mod.apply_rotary_pos_emb(xh, xh, cos, sin)
    return q[0].transpose(0, 1)


def qk_outputs(model, arch, layer, text=TEXT):
    """Pre-rotary q (T × H × hd) and k (T × H_kv × hd) of ``text`` at ``layer``."""
    from helpers import tiny_tokenizer
    geom = attention_geometry(model, arch, layer)
    ids = tiny_tokenizer()(text, return_tensors="pt")
    with capture_outputs(qkv_modules(model, arch, layer)) as seen:
        model(**ids)
    out = split_qkv(arch, geom, {k: v[0][0] for k, v in seen.items()})
    T = out["q"].shape[0]
    return out["q"].view(T, geom.n_heads, geom.head_dim), out["k"].view(T, geom.n_kv, geom.head_dim)


def head_scores(model, family, q, k, geom):
    """score[h, a, b] = ⟨rope(q)_h(a), rope(k)_{g(h)}(b)⟩ with the family's own rotary map."""
    pos = torch.arange(q.shape[0])
    qr, kr = model_rope(model, family, q, pos), model_rope(model, family, k, pos)
    kr = kr.repeat_interleave(geom.groups, dim=1)
    return torch.einsum("ahd,bhd->hab", qr, kr)


def slot_sums(scores, geom):
    """Σ_g score_{(g,s)} for every slot s (heads h = g·G + s)."""
    return scores.view(geom.n_kv, geom.groups, *scores.shape[1:]).sum(0)


def rope_matrix_action(model, family, R, geom, positions, gen):
    """(rope(R·x), R·rope(x)) for random kv-layout vectors x at ``positions``."""
    x = torch.randn(len(positions), geom.n_kv, geom.head_dim, generator=gen, dtype=torch.float64)
    Rx = (x.reshape(len(positions), -1) @ R.T).view_as(x)
    lhs = model_rope(model, family, Rx, positions)
    rhs = (model_rope(model, family, x, positions).reshape(len(positions), -1) @ R.T).view_as(x)
    return lhs, rhs


def real_keys(editor, module, layer=1):
    K, _ = unit_keys_and_outputs(editor.model, editor.tok, editor.arch, layer, module, 2, [REQ],
                                 editor.context_templates())
    return K


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_q_and_k_receive_the_same_orthogonal_matrix(family):
    """R recovered from W_k' = R·W_k (pseudo-inverse of a full-row-rank W_k) is the rule's R, is
    orthogonal, commutes with the rotary map, and W_q' = (R ⊗ I_G)·W_q, b_k' = R·b_k, b_q' likewise;
    V (also inside the fused parameter) is untouched."""
    editor, model, tok = unit_editor(family, modules=("attn.qk",), lam=0.05)
    editor.prepare()
    arch, geom = editor.arch, attention_geometry(model, editor.arch, 1)
    views0 = {w: tuple(None if t is None else t.clone().double() for t in qkv_views(model, arch, 1, geom, w))
              for w in "qkv"}
    K = real_keys(editor, "attn.qk")
    resid = torch.randn(model.config.hidden_size, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = editor.rules["attn.qk"].update(1, editor.unit_weights(1, "attn.qk"), K, 3 * resid)
    views1 = {w: tuple(None if t is None else t.double() for t in qkv_views(model, arch, 1, geom, w)) for w in "qkv"}
    Wk0, Wk1 = views0["k"][0].reshape(geom.d_kv, -1), views1["k"][0].reshape(geom.d_kv, -1)
    assert torch.linalg.matrix_rank(Wk0) == geom.d_kv
    R = Wk1 @ torch.linalg.pinv(Wk0)
    eye = torch.eye(geom.d_kv, dtype=torch.float64)
    torch.testing.assert_close(R.T @ R, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(R, res.undo.R, atol=1e-10, rtol=0)
    assert float((R - eye).abs().max()) > 1e-3, "the edit did not rotate"
    L = lift_q(R, geom)
    torch.testing.assert_close(views1["q"][0].reshape(geom.d_q, -1), L @ views0["q"][0].reshape(geom.d_q, -1),
                               atol=1e-12, rtol=0)
    if views0["k"][1] is not None:
        torch.testing.assert_close(views1["k"][1].reshape(-1), R @ views0["k"][1].reshape(-1), atol=1e-12, rtol=0)
        torch.testing.assert_close(views1["q"][1].reshape(-1), L @ views0["q"][1].reshape(-1), atol=1e-12, rtol=0)
    assert torch.equal(views1["v"][0], views0["v"][0])
    if views0["v"][1] is not None:
        assert torch.equal(views1["v"][1], views0["v"][1])
    lhs, rhs = rope_matrix_action(model, family, R, geom, torch.tensor([0, 5, 33, 90]),
                                  torch.Generator().manual_seed(2))
    torch.testing.assert_close(lhs, rhs, atol=1e-9, rtol=0)


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_structured_rotations_commute_with_the_models_rotary_map_and_keep_slot_sums(family):
    """For a random R of the class (Haar in each factor): rope(R·x) = R·rope(x) at random positions
    with the family's own rotary module; applied to the model, every slot's summed score Σ_g
    score_(g,s)(a, b) on unrelated text is unchanged while the individual heads' scores change.
    A generic orthogonal matrix does not commute with a rotary map (the check has teeth)."""
    editor, model, tok = unit_editor(family, modules=("attn.qk",))
    arch, geom = editor.arch, attention_geometry(model, editor.arch, 1)
    gen = torch.Generator().manual_seed(0)
    R = random_structured_rotation(geom, gen)
    torch.testing.assert_close(R.T @ R, torch.eye(geom.d_kv, dtype=torch.float64), atol=1e-12, rtol=0)
    positions = torch.randint(0, 120, (6,), generator=gen)
    lhs, rhs = rope_matrix_action(model, family, R, geom, positions, gen)
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)
    if geom.rot:
        Q = torch.linalg.qr(torch.randn(geom.d_kv, geom.d_kv, generator=gen, dtype=torch.float64))[0]
        lhs, rhs = rope_matrix_action(model, family, Q, geom, positions, gen)
        assert float((lhs - rhs).abs().max()) > 1e-2
    q0, k0 = qk_outputs(model, arch, 1)
    before = head_scores(model, family, q0, k0, geom)
    W = editor.unit_weights(1, "attn.qk")
    for which, t in (("k", W.k), ("q", W.q), ("k", W.bk), ("q", W.bq)):
        if t is not None:
            rotate_heads_(t, R, geom, which)
    q1, k1 = qk_outputs(model, arch, 1)
    after = head_scores(model, family, q1, k1, geom)
    torch.testing.assert_close(slot_sums(after, geom), slot_sums(before, geom), atol=1e-9, rtol=1e-9)
    assert float((after - before).abs().max()) > 1e-3 * float(before.abs().max())


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_edit_term_leaves_attention_scores_and_outputs_unchanged(family):
    """With the edit term weighted ~0 (edit weight 1e-30) or a zero residual, both attention rules
    return the identity and the model's attention scores on unrelated text stay to 1e-6."""
    editor, model, tok = unit_editor(family, modules=("attn.qk", "attn.v"))
    editor.prepare()
    arch, geom = editor.arch, attention_geometry(model, editor.arch, 1)
    q0, k0 = qk_outputs(model, arch, 1)
    before = head_scores(model, family, q0, k0, geom)
    ids = tok(TEXT, return_tensors="pt")
    logits0 = model(**ids).logits
    resid = torch.randn(model.config.hidden_size, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for module in ("attn.qk", "attn.v"):
        K = real_keys(editor, module)
        K = K.T if module == "attn.v" else K
        for r, w in ((resid, torch.tensor([1e-30])), (torch.zeros_like(resid), None)):
            res = editor.rules[module].update(1, editor.unit_weights(1, module), K, r, edit_weights=w)
            R = res.undo.R
            eye = torch.eye(R.shape[-1], dtype=R.dtype).expand_as(R)
            assert float((R - eye).abs().max()) < 1e-12, (module, float((R - eye).abs().max()))
    q1, k1 = qk_outputs(model, arch, 1)
    torch.testing.assert_close(head_scores(model, family, q1, k1, geom), before, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(**ids).logits, logits0, atol=1e-9, rtol=0)


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_v_rotation_is_a_block_rotation_of_the_output_projections_input(family):
    """After attn.v's update, on unrelated text: the o_proj input is R̃·u (R̃ = ⊕_h R_g(h)) and the
    attention output is W_o·R̃·u (+ b_o), checked against a forward pass."""
    editor, model, tok = unit_editor(family, modules=("attn.v",), lam=0.05)
    editor.prepare()
    arch = editor.arch
    geom = attention_geometry(model, arch, 1)
    o_proj = arch.sub(model, 1, arch.attn_out)
    ids = tok(TEXT, return_tensors="pt")
    with capture_inputs({"u": o_proj}) as si:
        model(**ids)
    u0 = si["u"][0][0]
    K = real_keys(editor, "attn.v")
    resid = torch.randn(model.config.hidden_size, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    res = editor.rules["attn.v"].update(1, editor.unit_weights(1, "attn.v"), K.T, 3 * resid)
    Rt = block_diag_heads(res.undo.R, geom)
    assert float((Rt - torch.eye(geom.d_q, dtype=torch.float64)).abs().max()) > 1e-3
    with capture_inputs({"u": o_proj}) as si, capture_outputs({"y": o_proj}) as so:
        model(**ids)
    torch.testing.assert_close(si["u"][0][0], u0 @ Rt.T, atol=1e-10, rtol=0)
    W_o = editor.unit_weights(1, "attn.v").o.double()
    b_o = getattr(o_proj, "bias", None)
    expected = u0 @ Rt.T @ W_o.T + (0 if b_o is None else b_o)
    torch.testing.assert_close(so["y"][0][0], expected, atol=1e-10, rtol=0)
    # a rotation mixing kv heads does not act on u as the same map would (the heads' attention weights
    # differ): the block structure is what makes the factorisation exact, and the check has teeth
    mixed = torch.linalg.qr(torch.randn(geom.d_kv, geom.d_kv, generator=torch.Generator().manual_seed(5),
                                        dtype=torch.float64))[0]
    W = editor.unit_weights(1, "attn.v")
    rotate_heads_(W.v, mixed, geom, "k")
    if W.bv is not None:
        rotate_heads_(W.bv, mixed, geom, "k")
    with capture_inputs({"u": o_proj}) as si:
        model(**ids)
    naive = u0 @ Rt.T @ lift_q(mixed, geom).T
    assert float((naive - si["u"][0][0]).abs().max()) > 1e-3


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_attention_matches_the_model_and_J_is_its_derivative(family):
    editor, model, tok = unit_editor(family, modules=("attn.qk",))
    K = real_keys(editor, "attn.qk")
    assert K.mismatch < 1e-10, K.mismatch
    geom = attention_geometry(model, editor.arch, 1)
    gen = torch.Generator().manual_seed(6)
    T = 7
    q = torch.randn(geom.n_heads, geom.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(T, geom.n_kv, geom.head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(T, geom.n_kv, geom.head_dim, generator=gen, dtype=torch.float64)
    from mose_fast.hf.arch import rotary_cos_sin
    cos, sin = (rotary_cos_sin(model, editor.arch, torch.arange(T)) if geom.rot
                else (torch.zeros(T, 0, dtype=torch.float64),) * 2)
    _, J = attention_at(q, k, v, cos, sin, geom)
    full = torch.autograd.functional.jacobian(lambda x: attention_at(x, k, v, cos, sin, geom)[0], q)
    for h in range(geom.n_heads):
        torch.testing.assert_close(J[h], full[h, :, h, :], atol=1e-12, rtol=1e-10)
        others = [g for g in range(geom.n_heads) if g != h]
        assert float(full[h][:, others].abs().max()) == 0.0


@pytest.mark.parametrize("geom", [AttnGeometry(4, 2, 8, 4, "rotate_half", 0.35),
                                  AttnGeometry(2, 2, 6, 6, "rotate_every_two", 0.4),
                                  AttnGeometry(3, 3, 4, 0, "none", 0.5)], ids=["partial-half", "every-two", "none"])
def test_structured_polar_is_the_optimum_of_its_class(geom):
    gen = torch.Generator().manual_seed(7)
    M = torch.randn(geom.d_kv, geom.d_kv, generator=gen, dtype=torch.float64)
    R = structured_polar(M, geom)
    eye = torch.eye(geom.d_kv, dtype=torch.float64)
    torch.testing.assert_close(R.T @ R, eye, atol=1e-12, rtol=0)
    best = float(torch.trace(R.T @ M))
    if geom.rot == 0:                            # no rotary map: the ordinary polar factor
        U, _, Vh = torch.linalg.svd(M)
        torch.testing.assert_close(R, U @ Vh, atol=1e-10, rtol=0)
    # R is complex-linear on every pair across heads: it commutes with the complex structure
    re, im, pas = kv_pair_indices(geom)
    Jc = torch.zeros_like(M)
    for r, i in zip(re, im):
        Jc[i[:, None], r[None, :]] = torch.eye(len(r), dtype=M.dtype)
        Jc[r[:, None], i[None, :]] = -torch.eye(len(r), dtype=M.dtype)
    if geom.rot:
        torch.testing.assert_close(R @ Jc, Jc @ R, atol=1e-12, rtol=0)
        # tr(Rᵀ·M) is the same against the complex-linear average (M + JᵀMJ)/2 (pass dims kept as they are)
        Mbar = M.clone()
        rot = torch.cat([re.reshape(-1), im.reshape(-1)])
        avg = 0.5 * (M + Jc.T @ M @ Jc)
        Mbar[rot[:, None], rot[None, :]] = avg[rot[:, None], rot[None, :]]
        assert abs(float(torch.trace(R.T @ Mbar)) - best) < 1e-10
    for _ in range(100):                         # no element of the class does better
        Rr = random_structured_rotation(geom, gen)
        assert float(torch.trace(Rr.T @ M)) <= best + 1e-10
    # no direction of the class improves: R·exp(εA) for A in its Lie algebra (antisymmetric, within
    # the blocks of pair indices and of the pass dims, commuting with the complex structure)
    block = torch.full((geom.d_kv,), -1, dtype=torch.long)
    for n, r in enumerate(re):
        block[r], block[im[n]] = n, n
    block[pas] = len(re)
    for _ in range(20):
        B = torch.randn(M.shape, generator=gen, dtype=M.dtype)
        A = (B - B.T) * (block[:, None] == block[None, :])
        if geom.rot:
            rot = torch.cat([re.reshape(-1), im.reshape(-1)])
            avg = 0.5 * (A + Jc.T @ A @ Jc)
            A[rot[:, None], rot[None, :]] = avg[rot[:, None], rot[None, :]]
        for eps in (1e-3, -1e-3):
            Re = R @ torch.matrix_exp(eps * A)
            if geom.rot:
                torch.testing.assert_close(Re @ Jc, Jc @ Re, atol=1e-12, rtol=0)
            assert float(torch.trace(Re.T @ M)) <= best + 1e-12
