"""Each additive baseline on a small synthetic problem, against its defining property written
independently here, plus each rule end to end through the editor on a tiny model."""
import pytest
import torch

from conftest import make_tiny_model, tiny_mose_config, tiny_second_moments
from mose_fast import EditRequest, MOSEEditor
from mose_fast.rules import AlphaEditRule, MEMITRule, PRUNERule, RECTRule, ROMERule
from mose_fast.rules.alphaedit import null_space_projector

D_OUT, D_IN, N0, N = 12, 20, 400, 3


def problem(seed=0, low_rank_keys=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    if low_rank_keys:   # preserved keys live in a 14-dim subspace: C0 has a 6-dim null space
        basis = torch.linalg.qr(torch.randn(D_IN, 14, generator=g, dtype=torch.float64))[0]
        K0 = basis @ torch.randn(14, N0, generator=g, dtype=torch.float64)
    else:
        K0 = torch.randn(D_IN, N0, generator=g, dtype=torch.float64)
    C0 = K0 @ K0.T / N0
    K = torch.randn(D_IN, N, generator=g, dtype=torch.float64)
    resid = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    return W, K0, C0, K, resid


def run(rule, W, C0, K, resid, layer=0):
    rule.prepare(layer, W, C0)
    W1 = W.clone()
    rule.update(layer, W1, K, resid)
    return W1 - W


def test_memit_satisfies_normal_equations():
    W, _, C0, K, resid = problem(1)
    lam = 7.0
    D = run(MEMITRule(lam), W, C0, K, resid)
    # argmin_Δ λ·tr(Δ·C0·Δᵀ) + ‖(W+Δ)·K − (W·K + resid)‖²  ⇔  Δ·(λ·C0 + K·Kᵀ) = resid·Kᵀ
    torch.testing.assert_close(D @ (lam * C0 + K @ K.T), resid @ K.T, rtol=1e-10, atol=1e-10)


def test_rome_is_exact_and_rank_one_along_c0_inverse_key():
    W, _, C0, K, resid = problem(2)
    k, r = K[:, :1], resid[:, :1]
    D = run(ROMERule(), W, C0, k, r)
    torch.testing.assert_close((W + D) @ k, W @ k + r, rtol=1e-10, atol=1e-10)
    assert torch.linalg.matrix_rank(D) == 1
    # Δ·x = 0 for every x with xᵀ·C0⁻¹·k = 0
    u = torch.linalg.solve(C0, k[:, 0])
    x = torch.randn(D_IN, dtype=torch.float64)
    x -= (x @ u) / (u @ u) * u
    assert float((D @ x).abs().max()) <= 1e-10


def test_alphaedit_update_lives_in_null_space():
    W, K0, C0, K, resid = problem(3, low_rank_keys=True)
    rule = AlphaEditRule(threshold=1e-6, l2=1.0)
    D = run(rule, W, C0, K, resid)
    P = rule.P[0]
    assert torch.linalg.matrix_rank(P) == D_IN - 14
    torch.testing.assert_close(D, D @ P, atol=1e-10, rtol=0)          # rows in the projector's range
    assert float((D @ K0).abs().max()) <= 1e-8 * float((W @ K0).abs().max())   # preserved keys untouched
    assert float((D @ K).abs().max()) > 1e-3                             # yet it edits


def test_alphaedit_threshold_is_relative_and_cumulative_keys_grow():
    _, _, C0, K, _ = problem(4, low_rank_keys=True)
    torch.testing.assert_close(null_space_projector(C0, 1e-6), null_space_projector(1000 * C0, 1e-6))
    rule = AlphaEditRule(threshold=1e-6)
    rule.prepare(0, torch.zeros(D_OUT, D_IN, dtype=torch.float64), C0)
    rule.after_edit(0, K)
    rule.after_edit(0, K)
    torch.testing.assert_close(rule.C_p[0], 2 * K @ K.T)


def test_alphaedit_matches_its_closed_form():
    W, _, C0, K, resid = problem(5, low_rank_keys=True)
    rule = AlphaEditRule(threshold=1e-6, l2=3.0)
    rule.prepare(0, W, C0)
    Cp = torch.randn(D_IN, 4, dtype=torch.float64)
    rule.C_p[0] = Cp @ Cp.T
    W1 = W.clone()
    rule.update(0, W1, K, resid)
    P = rule.P[0]
    # (P·(K·Kᵀ + C_p) + L2·I)·Δᵀ = P·K·residᵀ
    lhs = (P @ (K @ K.T + Cp @ Cp.T) + 3.0 * torch.eye(D_IN, dtype=torch.float64)) @ (W1 - W).T
    torch.testing.assert_close(lhs, P @ K @ resid.T, rtol=1e-9, atol=1e-9)


def test_rect_keeps_top_relative_changes():
    W, _, C0, K, resid = problem(6)
    full = run(MEMITRule(5.0), W, C0, K, resid)
    D = run(RECTRule(5.0, keep_ratio=0.25), W, C0, K, resid)
    kept = D != 0
    assert kept.sum() == round(0.25 * D.numel())
    torch.testing.assert_close(D[kept], full[kept])
    rel = (full / W).abs()
    assert float(rel[kept].min()) >= float(rel[~kept].max())


def test_prune_caps_singular_values_of_accumulated_update():
    W, _, C0, K, resid = problem(7)
    rule = PRUNERule(1e-3)                       # tiny λ: big updates whose σ exceed σ_max(W0)
    rule.prepare(0, W, C0)
    s_max = float(torch.linalg.matrix_norm(W, ord=2))
    Wc, memit_total = W.clone(), torch.zeros_like(W)
    for step in range(3):
        ref = torch.linalg.solve(1e-3 * C0 + K @ K.T, K)
        memit_total = (Wc - W) + (100 * resid) @ ref.T
        rule.update(0, Wc, K, 100 * resid)
        U, S, Vh = torch.linalg.svd(memit_total, full_matrices=False)
        expect = torch.where(S > s_max, s_max + torch.log(S / s_max), S)
        assert S.max() > s_max                                    # the cap was exercised
        torch.testing.assert_close(torch.linalg.svdvals(Wc - W), expect, rtol=1e-9, atol=1e-9)


def test_prune_is_memit_when_below_the_cap():
    W, _, C0, K, resid = problem(8)
    torch.testing.assert_close(run(PRUNERule(50.0), W, C0, K, 0.01 * resid), run(MEMITRule(50.0), W, C0, K, 0.01 * resid))


REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")


@pytest.mark.model
@pytest.mark.parametrize("method, layers, hp", [("memit", [1, 2], {"mom2_update_weight": 10.0}),
                                               ("rome", [2], {}),
                                               ("alphaedit", [1, 2], {"threshold": 0.05, "l2": 1.0}),
                                               ("rect", [1, 2], {"mom2_update_weight": 10.0}),
                                               ("prune", [1, 2], {"mom2_update_weight": 10.0}),
                                               ("mose", [1, 2], {"side": "input", "retain": "original",
                                                                 "edit_memory": 1.0})])
def test_each_baseline_edits_through_the_editor_and_undoes(method, layers, hp):
    from mose_fast.eval.metrics import answer_nll
    model, tok = make_tiny_model("llama")
    cfg = tiny_mose_config(method=method, layers=layers, rule_hparams=hp)
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, layers), progress=False)
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in layers}
    before = answer_nll(model, tok, [REQ.text], [REQ.target_new])[0]
    rec = editor.edit(REQ)
    assert answer_nll(model, tok, [REQ.text], [REQ.target_new])[0] < before
    assert all(l.objective <= l.objective_identity for l in rec.layers)
    editor.undo()
    for l in layers:
        torch.testing.assert_close(editor.arch.weight_view(model, l), W0[l], rtol=0, atol=1e-5)


def test_rome_refuses_several_layers():
    model, tok = make_tiny_model("llama")
    with pytest.raises(ValueError, match="single layer"):
        MOSEEditor(model, tok, tiny_mose_config(method="rome", layers=[1, 2]), second_moments={})
    with pytest.raises(ValueError, match="unknown method"):
        MOSEEditor(model, tok, tiny_mose_config(method="magic"), second_moments={})


# --- MOSE options (issue 4): retention of the unedited model, edit memory, norm-matched targets ---

def _scipy_rotation(X, Y):
    """argmin over orthogonal R of ‖R·X − Y‖_F, by SciPy on the stacked columns."""
    import scipy.linalg
    Rt, _ = scipy.linalg.orthogonal_procrustes(X.T.numpy(), Y.T.numpy())
    return torch.from_numpy(Rt.T)


@pytest.mark.parametrize("retain, mu", [("original", 0.0), ("current", 2.0), ("original", 2.0)])
def test_mose_options_solve_the_stacked_procrustes_problem(retain, mu):
    """Two sequential edits; the second one's rotation equals SciPy's on the stacked problem
    [√(λ/N)·W·K0 | √μ·W·K1 | A2] → [√(λ/N)·Y0 | √μ·W·K1 | V2] with Y0 = W0·K0 ("original") or
    W·K0 ("current"), and the reported objective is that problem's value at R."""
    from mose_fast.rules import MOSERule
    W0, K0, C0, K, resid = problem(20)
    lam = 3.0
    rule = MOSERule(lam, retain=retain, edit_memory=mu)
    W = W0.clone()
    rule.prepare(0, W, C0)
    rule.update(0, W, K[:, :1], resid[:, :1])
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:3], resid[:, 1:3])
    R = W @ torch.linalg.pinv(W1)                      # the rotation just applied (W1 has full row rank)
    w = (lam / N0) ** 0.5
    A2 = W1 @ K[:, 1:3]
    V2 = A2 + resid[:, 1:3]
    Y0 = (W0 if retain == "original" else W1) @ K0
    X = torch.cat([w * W1 @ K0, mu ** 0.5 * W1 @ K[:, :1], A2], 1)
    Y = torch.cat([w * Y0, mu ** 0.5 * W1 @ K[:, :1], V2], 1)
    torch.testing.assert_close(R, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert res.objective == pytest.approx(float((R @ X - Y).pow(2).sum()), rel=1e-9)
    assert res.objective_identity == pytest.approx(float((X - Y).pow(2).sum()), rel=1e-9)
    assert res.objective < res.objective_identity


def test_mose_retain_original_pulls_back_towards_the_unedited_model():
    """With nothing to edit (resid = 0), "current" leaves W alone, while "original" rotates a
    drifted W back towards W0 on the corpus keys (not all the way: the edit term asks to keep
    the drifted output on the edit key)."""
    from mose_fast.rules import MOSERule
    W0, K0, C0, K, resid = problem(21)
    drift = torch.linalg.matrix_exp(0.2 * (lambda S: S - S.T)(torch.randn(D_OUT, D_OUT, dtype=torch.float64,
                                                                        generator=torch.Generator().manual_seed(1))))
    for retain in ("current", "original"):
        rule = MOSERule(10.0, retain=retain)
        W = W0.clone()
        rule.prepare(0, W, C0)
        W.copy_(drift @ W0)                         # drift applied behind the rule's back ...
        rule.gram[0] = rule.gram[0] @ drift.T if retain == "original" else drift @ rule.gram[0] @ drift.T
        before = float((W @ K0 - W0 @ K0).norm())
        rule.update(0, W, K[:, :1], torch.zeros(D_OUT, 1, dtype=torch.float64))
        after = float((W @ K0 - W0 @ K0).norm())
        if retain == "current":
            assert after == pytest.approx(before, rel=1e-9)
        else:
            assert after < 0.2 * before


def test_mose_match_norms_meets_the_target_direction_exactly():
    from mose_fast.rules import MOSERule
    W, _, C0, K, resid = problem(22)
    rule = MOSERule(0.0, match_norms=True)
    rule.prepare(0, W, C0)
    W1 = W.clone()
    rule.update(0, W1, K[:, :1], 5.0 * resid[:, :1])
    a, v = W @ K[:, :1], W @ K[:, :1] + 5.0 * resid[:, :1]
    got = W1 @ K[:, :1]
    assert float(got.norm()) == pytest.approx(float(a.norm()), rel=1e-12)          # a rotation's output
    torch.testing.assert_close(got / got.norm(), v / v.norm(), atol=1e-12, rtol=0)  # aimed exactly


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_mose_memory_undo_and_snapshot(polar_method):
    from mose_fast.rules import MOSERule
    W0, K0, C0, K, resid = problem(23)
    rule = MOSERule(3.0, polar_method=polar_method, retain="original", edit_memory=1.0)
    W = W0.clone()
    rule.prepare(0, W, C0)
    rule.update(0, W, K[:, :1], resid[:, :1])
    state = rule.snapshot()
    W1 = W.clone()
    assert set(state) == {0, "E0"} and float(state["E0"].norm()) > 0
    res = rule.update(0, W, K[:, 1:2], resid[:, 1:2])
    rule.revert(0, W, res.undo)
    torch.testing.assert_close(W, W1, atol=1e-12, rtol=0)
    for key, ref in state.items():
        got = rule.memory[0] if key == "E0" else rule.gram[0]
        torch.testing.assert_close(got, ref, atol=1e-10 * float(ref.abs().max()), rtol=0)
    rule.restore(state)
    assert rule.memory[0] is state["E0"] and rule.gram[0] is state[0]


def test_mose_bad_options_raise():
    from mose_fast.rules import MOSERule
    with pytest.raises(ValueError, match="retain"):
        MOSERule(1.0, retain="both")
    with pytest.raises(ValueError, match="edit_memory"):
        MOSERule(1.0, edit_memory=-1.0)


def test_make_rule_passes_mose_options_and_rejects_unknown_ones():
    from mose_fast.rules import make_rule
    rule = make_rule(tiny_mose_config(rule_hparams={"retain": "original", "edit_memory": 0.5}))
    assert (rule.retain, rule.edit_memory, rule.match_norms) == ("original", 0.5, False)
    with pytest.raises(ValueError, match="bad rule_hparams for mose"):
        make_rule(tiny_mose_config(rule_hparams={"retian": "original"}))


@pytest.mark.model
def test_alphaedit_undo_frees_the_undone_edits_keys():
    """After edit, edit, undo: W and AlphaEdit's cumulative K_p·K_pᵀ are those after the first edit
    (float64 reference: the first edit's keys, recomputed on the model)."""
    from mose_fast.memit.keys import compute_keys
    model, tok = make_tiny_model("llama")
    layers = [1, 2]
    cfg = tiny_mose_config(method="alphaedit", layers=layers, rule_hparams={"threshold": 0.05, "l2": 1.0})
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, layers), progress=False)
    editor.edit(REQ)
    W1 = {l: editor.weight(l).clone() for l in layers}
    Cp1 = {l: editor.rule.C_p[l].clone() for l in layers}
    req2 = EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")
    editor.edit(req2)
    assert all(float((editor.rule.C_p[l] - Cp1[l]).abs().max()) > 0 for l in layers)
    editor.undo()
    for l in layers:
        torch.testing.assert_close(editor.weight(l), W1[l], rtol=0, atol=1e-5)
        torch.testing.assert_close(editor.rule.C_p[l], Cp1[l], rtol=1e-9, atol=1e-9 * float(Cp1[l].abs().max()))
    editor.undo()
    templates = editor.context_templates()
    for l in layers:
        assert float(editor.rule.C_p[l].abs().max()) <= 1e-9 * float(Cp1[l].abs().max())
    # and the first edit's own contribution was its keys' Gram
    K = compute_keys(model, tok, editor.arch, layers[0], [REQ], templates).double().T
    torch.testing.assert_close(Cp1[layers[0]], K @ K.T, rtol=1e-5, atol=1e-6 * float((K @ K.T).abs().max()))
