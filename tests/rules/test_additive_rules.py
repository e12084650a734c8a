"""Each additive rule on a small synthetic problem, against its defining property written
independently here; the Rule interface (update leaves the state alone, commit/undo/state_dict);
and each rule end to end through the editor on a tiny model."""
import pytest
import torch

from mose_fast import EditRequest, MOSEEditor
from mose_fast.rules import AlphaEditRule, MEMITRule, PRUNERule, RECTRule, ROMERule
from mose_fast.rules.alphaedit import null_space_projector

from helpers import D_IN, D_OUT, make_tiny_model, tiny_mose_config, tiny_second_moments
from helpers import synthetic_problem as problem


def run(rule, W, C0, K, resid, layer=0):
    rule.prepare(layer, W, C0)
    W1 = W.clone()
    rule.update(layer, W1, K, resid)
    return W1 - W


def test_memit_satisfies_normal_equations():
    W, _, C0, K, resid = problem(1)
    lam = 7.0
    D = run(MEMITRule(mom2_update_weight=lam), W, C0, K, resid)
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
    W = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    rule.prepare(0, W, C0)
    res = rule.update(0, W.clone(), K, torch.ones(D_OUT, K.shape[1], dtype=torch.float64))
    assert float(rule.C_p[0].abs().max()) == 0.0          # update alone leaves the state as it was
    rule.commit(0, res.undo)
    rule.commit(0, res.undo)
    torch.testing.assert_close(rule.C_p[0], 2 * K @ K.T, atol=1e-12, rtol=0)
    rule.undo(0, res.undo)
    torch.testing.assert_close(rule.C_p[0], K @ K.T, atol=1e-12, rtol=0)


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
    full = run(MEMITRule(mom2_update_weight=5.0), W, C0, K, resid)
    D = run(RECTRule(mom2_update_weight=5.0, keep_ratio=0.25), W, C0, K, resid)
    kept = D != 0
    assert kept.sum() == round(0.25 * D.numel())
    torch.testing.assert_close(D[kept], full[kept])
    rel = (full / W).abs()
    assert float(rel[kept].min()) >= float(rel[~kept].max())


def test_prune_caps_singular_values_of_accumulated_update():
    W, _, C0, K, resid = problem(7)
    rule = PRUNERule(mom2_update_weight=1e-3)                      # tiny λ: big updates whose σ exceed σ_max(W0)
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
    torch.testing.assert_close(run(PRUNERule(mom2_update_weight=50.0), W, C0, K, 0.01 * resid),
                               run(MEMITRule(mom2_update_weight=50.0), W, C0, K, 0.01 * resid))


REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")


@pytest.mark.model
@pytest.mark.parametrize("method, layers, hp", [("memit", [1, 2], {"mom2_update_weight": 10.0}),
                                               ("rome", [2], {}),
                                               ("alphaedit", [1, 2], {"threshold": 0.05, "l2": 1.0}),
                                               ("rect", [1, 2], {"mom2_update_weight": 10.0}),
                                               ("prune", [1, 2], {"mom2_update_weight": 10.0}),
                                               ("mose", [1, 2], {"side": "output"}),
                                               ("mose", [1, 2], {"side": "input", "edit_memory": 1.0})])
def test_each_rule_edits_through_the_editor_and_undoes_bit_for_bit(method, layers, hp):
    from mose_fast.hf.scoring import answer_nll
    model, tok = make_tiny_model("llama")
    cfg = tiny_mose_config(method=method, layers=layers, rule_hparams=hp)
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, layers), progress=False)
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in layers}
    before = answer_nll(model, tok, [REQ.text], [REQ.target_new])[0]
    rec = editor.edit(REQ)
    assert answer_nll(model, tok, [REQ.text], [REQ.target_new])[0] < before
    assert all(l.objective <= l.objective_identity for l in rec.layers)
    assert all(not torch.equal(editor.arch.weight_view(model, l), W0[l]) for l in layers)
    editor.undo()
    for l in layers:
        assert torch.equal(editor.arch.weight_view(model, l), W0[l]), l
    assert answer_nll(model, tok, [REQ.text], [REQ.target_new])[0] == before


def test_rome_refuses_several_layers_and_unknown_methods_are_refused():
    model, tok = make_tiny_model("llama")
    with pytest.raises(ValueError, match="single layer"):
        MOSEEditor(model, tok, tiny_mose_config(method="rome", layers=[1, 2]), second_moments={})
    with pytest.raises(ValueError, match="method 'magic' is not a rule"):
        MOSEEditor(model, tok, tiny_mose_config(method="magic"), second_moments={})


@pytest.mark.parametrize("cls", [MEMITRule, ROMERule, AlphaEditRule, RECTRule, PRUNERule])
def test_update_changes_the_weights_only_and_commit_undo_move_the_state(cls):
    """update() changes W in place and leaves the rule's state as it was (the editor may throw the
    edit away); the returned record holds Δ = W_after − W_before and the edit's keys."""
    W0, _, C0, K, resid = problem(9, low_rank_keys=cls is AlphaEditRule)
    rule = cls()
    rule.prepare(0, W0, C0)
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    W = W0.clone()
    res = rule.update(0, W, K[:, :1], resid[:, :1])
    after = rule.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(res.undo.delta.double(), W - W0, atol=1e-6 * float(W0.abs().max()), rtol=0)
    assert torch.equal(res.undo.keys, K[:, :1])
    assert res.objective <= res.objective_identity
    rule.commit(0, res.undo)
    rule.undo(0, res.undo)
    after = rule.state_dict()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-12, rtol=0)


def test_additive_options_are_keyword_only_and_checked_by_name():
    with pytest.raises(TypeError):
        MEMITRule(7.0)
    assert MEMITRule(mom2_update_weight=7.0).lam == 7.0
    assert (AlphaEditRule(threshold=0.1, l2=2.0).threshold, AlphaEditRule(threshold=0.1, l2=2.0).l2) == (0.1, 2.0)
    for cls, kw, field in ((MEMITRule, {"mom2_update_weight": 0.0}, "mom2_update_weight"),
                           (AlphaEditRule, {"threshold": -1.0}, "threshold"),
                           (AlphaEditRule, {"l2": float("nan")}, "l2"),
                           (RECTRule, {"keep_ratio": 1.5}, "keep_ratio"),
                           (ROMERule, {"mom2_update_weight": 1.0}, "unknown option")):
        with pytest.raises(ValueError, match=field):
            cls(**kw)


def test_alphaedit_state_dict_round_trip_survives_prepare():
    """A run folder restores C_p before the first prepare(); prepare keeps it."""
    W, _, C0, K, resid = problem(10, low_rank_keys=True)
    rule = AlphaEditRule(threshold=1e-6)
    rule.prepare(0, W, C0)
    rule.commit(0, rule.update(0, W.clone(), K, resid).undo)
    state = {k: v.clone() for k, v in rule.state_dict().items()}
    assert set(state) == {"C_p.0"}
    fresh = AlphaEditRule(threshold=1e-6)
    fresh.load_state_dict(state)
    fresh.prepare(0, W, C0)
    assert torch.equal(fresh.C_p[0], state["C_p.0"])
    W1, W2 = W.clone(), W.clone()
    rule.update(0, W1, K, 2 * resid)
    fresh.update(0, W2, K, 2 * resid)
    assert torch.equal(W1, W2)


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
        assert torch.equal(editor.weight(l), W1[l]), l
        torch.testing.assert_close(editor.rule.C_p[l], Cp1[l], rtol=1e-9, atol=1e-9 * float(Cp1[l].abs().max()))
    editor.undo()
    templates = editor.context_templates()
    for l in layers:
        assert float(editor.rule.C_p[l].abs().max()) <= 1e-9 * float(Cp1[l].abs().max())
    # and the first edit's own contribution was its keys' Gram
    K = compute_keys(model, tok, editor.arch, layers[0], [REQ], templates).double().T
    torch.testing.assert_close(Cp1[layers[0]], K @ K.T, rtol=1e-5, atol=1e-6 * float((K @ K.T).abs().max()))
