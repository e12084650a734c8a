"""Several passes over the edited layers per edit (``MOSEConfig.edit_passes``): a second pass
meets more of the same target, the edit memory takes each edit once (from its last pass), and
undo takes every pass back."""
import pytest
import torch

import mose_fast.editor as editor_module
from conftest import (assert_state_unchanged, editor_state, fail_at_solve_call, make_tiny_model,
                      tiny_mose_config, tiny_second_moments)
from mose_fast import EditRequest, MOSEConfig, MOSEEditor
from mose_fast.keys import block_outputs_at_subject, compute_keys

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")
SIDES = [{"retain": "original", "edit_memory": 2.0},
         {"side": "input", "retain": "original", "edit_memory": 2.0}]


def edited(passes, rule_hparams, monkeypatch, lam=30.0):
    """A tiny Llama edited once with ``passes`` passes; also the target z the edit aimed at."""
    model, tok = make_tiny_model("llama")
    cfg = tiny_mose_config(lam=lam, edit_passes=passes, rule_hparams=rule_hparams)
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, cfg.layers), progress=False)
    editor._prepare()
    W0 = {l: editor.weight(l).clone() for l in cfg.layers}
    seen = {}
    real = editor_module.compute_targets

    def recording(*args, **kw):
        seen["targets"] = real(*args, **kw)
        return seen["targets"]

    monkeypatch.setattr(editor_module, "compute_targets", recording)
    editor.h_before = block_outputs_at_subject(model, tok, editor.arch, cfg.layers[-1], [REQ]).double()
    editor.edit(REQ)
    z = torch.stack([t.z for t in seen["targets"]]).double()
    return editor, model, tok, z, W0


def unmet(editor, model, tok, z):
    """‖z − h‖ at the last edited layer's output, for the edited subject."""
    h = block_outputs_at_subject(model, tok, editor.arch, editor.cfg.layers[-1], [REQ]).double()
    return float((z - h).norm())


@pytest.mark.model
@pytest.mark.parametrize("side", ["output", "input"])
def test_unmet_share_is_recorded(side, monkeypatch):
    editor, model, tok, z, _ = edited(1, {"side": side}, monkeypatch)
    expected = unmet(editor, model, tok, z) / float((z - editor.h_before).norm())
    assert editor.records[0].target_unmet == [pytest.approx(expected, rel=1e-9)]
    assert 0.05 < expected < 1.0     # moved towards z, not all the way (λ holds it back)


@pytest.mark.model
@pytest.mark.parametrize("side", ["output", "input"])
def test_second_pass_pushes_on_when_retaining_the_current_model(side, monkeypatch):
    """retain "current": pass 2 anchors at the model pass 1 left, so it moves further."""
    one, m1, tok1, z1, _ = edited(1, {"side": side}, monkeypatch, lam=300.0)
    two, m2, tok2, z2, _ = edited(2, {"side": side}, monkeypatch, lam=300.0)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)        # same seed: the same target
    assert two.records[0].target_unmet[0] < 0.97 * one.records[0].target_unmet[0]
    assert [l.edit_pass for l in two.records[0].layers] == [0, 0, 1, 1]


@pytest.mark.model
@pytest.mark.parametrize("side", ["output", "input"])
def test_second_pass_is_nearly_a_fixed_point_when_retaining_the_original(side, monkeypatch):
    """retain "original": pass 2 solves the problem pass 1 solved (same anchor W0·K0, same
    absolute target), so it hardly moves — exactly so at the last layer on the output side
    (test_anchored_resolve_is_the_identity)."""
    one, *_ = edited(1, {"side": side, "retain": "original"}, monkeypatch, lam=300.0)
    two, *_ = edited(2, {"side": side, "retain": "original"}, monkeypatch, lam=300.0)
    assert two.records[0].target_unmet[0] == pytest.approx(one.records[0].target_unmet[0], rel=0.01)


def test_anchored_resolve_is_the_identity():
    """Output side, retain original: re-solving towards the same absolute outputs V = W0·K + resid
    from W1 = R1·W0 gives R2 = I, since polar(λ·G·R1ᵀ + V·(R1·A)ᵀ) = polar(λ·G + V·Aᵀ)·R1ᵀ = R1·R1ᵀ."""
    from test_rules import problem
    from mose_fast.rules import MOSERule
    W0, _, C0, K, resid = problem(5)
    rule = MOSERule(3.0, retain="original")
    W = W0.clone()
    rule.prepare(0, W, C0)
    first = rule.update(0, W, K, resid)
    assert float((first.undo.R - torch.eye(W.shape[0], dtype=W.dtype)).norm()) > 0.1
    second = rule.update(0, W, K, (W0 @ K + resid) - W @ K)
    torch.testing.assert_close(second.undo.R, torch.eye(W.shape[0], dtype=W.dtype), atol=1e-10, rtol=0)
    # while with retain "current" the same second solve still rotates
    cur = MOSERule(3.0, retain="current")
    W = W0.clone()
    cur.prepare(0, W, C0)
    cur.update(0, W, K, resid)
    again = cur.update(0, W, K, (W0 @ K + resid) - W @ K)
    assert float((again.undo.R - torch.eye(W.shape[0], dtype=W.dtype)).norm()) > 1e-3


@pytest.mark.model
@pytest.mark.parametrize("hp", SIDES, ids=["output", "input"])
def test_edit_memory_takes_each_edit_once_from_its_last_pass(hp, monkeypatch):
    editor, model, tok, _, _ = edited(2, hp, monkeypatch)
    templates = editor.context_templates()
    for l in editor.cfg.layers:
        # keys at layer l depend on the layers before it only, so the final model gives the
        # keys the last pass saw at l
        K = compute_keys(model, tok, editor.arch, l, [REQ], templates).double().T       # d_in × 1
        if hp.get("side") == "input":
            expected = K @ K.T                                     # E = Σ K_p·K_pᵀ
        else:
            A = editor.weight(l).double() @ K                      # E = Σ (W·K_p)(W·K_p)ᵀ, W after the edit
            expected = A @ A.T
        got = editor.rule.memory[l]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.model
@pytest.mark.parametrize("hp", SIDES, ids=["output", "input"])
def test_undo_takes_back_every_pass(hp, monkeypatch):
    editor, model, _, _, W0 = edited(2, hp, monkeypatch)
    memory_scale = {l: float(e.abs().max()) for l, e in editor.rule.memory.items()}
    assert min(memory_scale.values()) > 0
    editor.undo(1)
    for l in editor.cfg.layers:
        W = editor.weight(l)
        assert float((W - W0[l]).abs().max()) <= 16 * torch.finfo(torch.float32).eps * float(W0[l].abs().max())
        assert float(editor.rule.memory[l].abs().max()) <= 1e-9 * memory_scale[l]


def test_edit_passes_must_be_a_positive_integer():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="edit_passes"):
            MOSEConfig(edit_passes=bad).validate()


@pytest.mark.model
def test_failure_in_the_second_pass_leaves_the_model_and_memory_untouched(monkeypatch):
    model, tok = make_tiny_model("llama")
    cfg = tiny_mose_config(lam=30.0, edit_passes=2, rule_hparams={"retain": "original", "edit_memory": 2.0})
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, cfg.layers), progress=False)
    editor.edit(REQ)                      # memory and cross Grams exist and have moved
    state = editor_state(editor)
    # the 4th solve is the second pass's second layer
    calls = fail_at_solve_call(monkeypatch, editor, 4, "injected failure in pass 2")
    with pytest.raises(RuntimeError, match="pass 2"):
        editor.edit(REQ)
    assert calls == [1, 2, 1, 2]
    assert_state_unchanged(editor, state)
    assert len(editor.records) == 1
