"""Per-request edit weights and re-solving edits that did not land (``MOSEConfig.land_retries``):
the weighted rotation against SciPy's Procrustes on the stacked problem with each edit column
scaled by √w, the memory left unweighted, and the editor's retry loop — it keeps the solve a direct
edit with the final weights would give, bit for bit, and stays all-or-nothing."""
import pytest
import torch

from mose_fast import EditRequest, MOSEConfig, MOSEEditor
from mose_fast.hf.scoring import landed
from mose_fast.rules import MOSEInputRule, MOSERule
from mose_fast.rules.mose_input import reachable_key_targets

from helpers import (
    N0,
    assert_state_unchanged,
    editor_state,
    fail_at_solve_call,
    make_tiny_model,
    tiny_mose_config,
    tiny_second_moments,
)
from helpers import ridged_cholesky as _chol
from helpers import scipy_rotation as _scipy_rotation
from helpers import synthetic_problem as problem

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")
WEIGHTS = torch.tensor([1.0, 9.0, 0.25], dtype=torch.float64)


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_weighted_output_rotation_solves_the_weighted_stacked_problem(polar_method):
    """R = argmin λ‖R·W·K0 − W·K0‖²/N + Σ_j w_j‖R·a_j − v_j‖², from SciPy on [√(λ/N)·W·K0 | √w·A]."""
    W0, K0, C0, K, resid = problem(40)
    K, resid, lam = K[:, :3], 0.5 * resid[:, :3], 3.0
    rule = MOSERule(lam, polar_method=polar_method)
    W = W0.clone()
    rule.prepare(0, W, C0)
    res = rule.update(0, W, K, resid, edit_weights=WEIGHTS)
    A, V, root = W0 @ K, W0 @ K + resid, WEIGHTS.sqrt()
    X = torch.cat([(lam / N0) ** 0.5 * W0 @ K0, A * root], 1)
    Y = torch.cat([(lam / N0) ** 0.5 * W0 @ K0, V * root], 1)
    R = _scipy_rotation(X, Y)
    torch.testing.assert_close(res.undo.rotation.dense(), R, atol=1e-9, rtol=0)
    torch.testing.assert_close(W, R @ W0, atol=1e-10, rtol=0)
    # the weights matter: the unweighted solve is another rotation
    plain = MOSERule(lam, polar_method=polar_method)
    W_plain = W0.clone()
    plain.prepare(0, W_plain, C0)
    plain.update(0, W_plain, K, resid)
    assert float((W_plain - W).abs().max()) > 1e-3


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_weighted_input_rotation_solves_the_weighted_stacked_problem_and_remembers_unweighted(polar_method):
    """Q = argmin λ‖Q·K0 − K0‖²/N + μ·0 + Σ_j w_j‖Q·k_j − k*_j‖²; on commit the memory takes the
    keys K unweighted."""
    W0, K0, C0, K, resid = problem(41)
    K, resid, lam, mu = K[:, :3], 0.3 * resid[:, :3], 3.0, 2.0
    rule = MOSEInputRule(lam, polar_method=polar_method, edit_memory=mu)
    W = W0.clone()
    rule.prepare(0, W, C0)
    res = rule.update(0, W, K, resid, edit_weights=WEIGHTS)
    K_target = reachable_key_targets(W0, K, resid, _chol(C0), W0 @ W0.T)
    root = WEIGHTS.sqrt()
    X = torch.cat([(lam / N0) ** 0.5 * K0, K * root], 1)
    Y = torch.cat([(lam / N0) ** 0.5 * K0, K_target * root], 1)
    Q = _scipy_rotation(X, Y)
    torch.testing.assert_close(res.undo.rotation.dense(), Q, atol=1e-9, rtol=0)
    torch.testing.assert_close(W, W0 @ Q, atol=1e-10, rtol=0)
    assert rule.memory[0].shape == (K.shape[0], 0)          # update alone: the memory is as it was
    rule.commit(0, res.undo)
    assert torch.equal(rule.memory[0], K.float())          # float32 keys, held exactly


@pytest.mark.parametrize("bad", [[1.0, 2.0], [1.0, 0.0, 1.0], [1.0, float("nan"), 1.0], [-1.0, 1.0, 1.0]])
def test_bad_rule_weights_are_refused_before_anything_moves(bad):
    W0, _, C0, K, resid = problem(42)
    for rule in (MOSERule(3.0), MOSEInputRule(3.0)):
        W = W0.clone()
        rule.prepare(0, W, C0)
        with pytest.raises(ValueError, match="edit_weights"):
            rule.update(0, W, K[:, :3], resid[:, :3], edit_weights=torch.tensor(bad, dtype=torch.float64))
        assert torch.equal(W, W0)


def _editor(side, lam, **kw):
    model, tok = make_tiny_model("llama")
    hparams = {"side": "input", "edit_memory": 2.0} if side == "input" else {"side": "output"}
    cfg = tiny_mose_config(lam=lam, rule_hparams=hparams, **kw)
    return MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, cfg.layers), progress=False)


@pytest.mark.model
@pytest.mark.parametrize("side, lands", [("output", True), ("input", False)])
def test_retries_keep_the_solve_a_direct_edit_with_the_final_weights_gives(side, lands):
    """Output side, λ = 30: the tiny Llama's edit misses at weight 1 and 10 and lands at 100.  Input
    side: it never lands, so every retry runs and the weight ends at boost^retries.  Either way the
    model, the rule state and the undo are those of one direct edit with the final weights."""
    retried = _editor(side, 30.0, land_retries=2, land_boost=10.0)
    assert landed(retried.model, retried.tok, [REQ]) == [0.0]
    W0 = {l: retried.weight(l).clone() for l in retried.cfg.layers}
    record = retried.edit(REQ)
    assert record.attempts == 3
    assert record.edit_weights == [100.0]
    assert landed(retried.model, retried.tok, [REQ]) == [1.0 if lands else 0.0]
    assert [l.attempt for l in record.layers] == [0, 0, 1, 1, 2, 2]

    direct = _editor(side, 30.0)
    direct.edit(REQ, edit_weights=record.edit_weights)
    for l in retried.cfg.layers:
        assert torch.equal(retried.weight(l), direct.weight(l)), l
    a, b = retried.rule.state_dict(), direct.rule.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # the undo stack holds the kept solve only: one undo is back at W0, bit for bit
    retried.undo(1)
    for l in retried.cfg.layers:
        assert torch.equal(retried.weight(l), W0[l]), l


@pytest.mark.model
def test_an_edit_that_lands_is_solved_once():
    editor = _editor("output", 0.1, land_retries=2, land_boost=10.0)
    record = editor.edit(REQ)
    assert landed(editor.model, editor.tok, [REQ]) == [1.0]
    assert record.landed == [1.0]            # the check of the kept weights, recorded (the runner reuses it)
    assert record.attempts == 1 and record.edit_weights is None
    assert {l.attempt for l in record.layers} == {0}


@pytest.mark.model
def test_failure_in_a_retry_leaves_the_model_and_rule_untouched(monkeypatch):
    editor = _editor("output", 30.0, land_retries=2, land_boost=10.0)
    editor.edit(EditRequest("The capital of France is", "France", "Rome", target_true="Paris"))
    state = editor_state(editor)
    monkeypatch.setattr(editor, "_landed", lambda requests: [0.0] * len(requests))   # always retry
    # the 3rd solve is the first retry's first layer
    fail_at_solve_call(monkeypatch, editor, 3, "injected failure in a retry")
    with pytest.raises(RuntimeError, match="retry"):
        editor.edit(REQ)
    assert_state_unchanged(editor, state)
    assert len(editor.records) == 1


@pytest.mark.model
def test_editor_refuses_bad_weights_and_leaves_the_model_untouched():
    editor = _editor("output", 30.0)
    editor.model.train()
    before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    for bad in ([1.0, 1.0], [0.0], [float("inf")]):
        with pytest.raises(ValueError, match="edit_weights"):
            editor.edit(REQ, edit_weights=bad)
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
    assert editor.model.training      # refused before the editor switched the model to eval mode
    model, tok = make_tiny_model("llama")
    additive = MOSEEditor(model, tok, tiny_mose_config(method="alphaedit"),
                          second_moments=tiny_second_moments(model, tok, [1, 2]), progress=False)
    with pytest.raises(ValueError, match="edit_weights need a MOSE rule"):
        additive.edit(REQ, edit_weights=[2.0])


def test_land_retry_options_are_checked():
    for kw, match in (({"land_retries": -1}, "land_retries"), ({"land_retries": 1.5}, "land_retries"),
                      ({"land_boost": 1.0}, "land_boost"),
                      ({"land_retries": 1, "method": "alphaedit", "rule_hparams": {}}, "MOSE rule")):
        with pytest.raises(ValueError, match=match):
            MOSEConfig(**kw).validate()


def test_cli_flags_reach_the_config():
    import argparse

    from mose_fast.cli import _add_model, build_config
    parser = argparse.ArgumentParser()
    _add_model(parser)
    cfg = build_config(parser.parse_args(["--land-retries", "3", "--land-boost", "8"]), "llama")
    assert (cfg.land_retries, cfg.land_boost) == (3, 8.0)
    assert build_config(parser.parse_args([]), "llama").land_retries == 2           # the mose preset's
    assert build_config(parser.parse_args(["--preset", "mose-paper"]), "llama").land_retries == 0
    with pytest.raises(ValueError, match="land_boost"):
        build_config(parser.parse_args(["--land-retries", "1", "--land-boost", "0.5"]), "llama")
    with pytest.raises(ValueError, match="land_retries.*MOSE rule"):
        build_config(parser.parse_args(["--preset", "memit", "--land-retries", "1"]), "llama")
