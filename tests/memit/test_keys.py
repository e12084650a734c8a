"""Keys per context template (``MOSEInputRule template_keys``, issue 4): the per-template keys against
keys computed one template at a time, the "all" rotation against SciPy's Procrustes on the stacked
problem with one column per (request, template) scaled by √(w·ω), the memory's second moment
Σ ω·k·kᵀ, undo, refusals, and the editor's edit staying all-or-nothing."""
import pytest
import torch

import mose_fast.rules.mose_input as mose_input
from conftest import (assert_state_unchanged, editor_state, make_tiny_model, tiny_mose_config,
                      tiny_second_moments)
from test_mose_input import _chol, _dense
from test_rules import N0, _scipy_rotation, problem
from mose_fast import EditRequest, MOSEEditor
from mose_fast.hf.arch import resolve_arch
from mose_fast.memit.keys import compute_keys, compute_template_keys, template_weights
from mose_fast.rules import MOSEInputRule, make_rule
from mose_fast.rules.mose_input import reachable_key_targets

REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French"),
        EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")]
TEMPLATES = [["{}"], ["Once upon a time. {}", "I think. {}", "The end. {}"]]
OMEGA = torch.tensor([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3], dtype=torch.float64)


def test_template_weights_are_memits_group_means():
    torch.testing.assert_close(template_weights(TEMPLATES), OMEGA, atol=0, rtol=0)
    torch.testing.assert_close(template_weights([["{}"]]), torch.ones(1, dtype=torch.float64), atol=0, rtol=0)


@pytest.mark.model
def test_per_template_keys_are_each_templates_own_key_and_average_to_the_mean_key():
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    rows = compute_template_keys(model, tok, arch, 1, REQS, TEMPLATES)
    flat = [t for g in TEMPLATES for t in g]
    assert rows.shape == (len(REQS), len(flat), model.config.intermediate_size)
    for t, template in enumerate(flat):    # one template at a time: a batch of its own, other padding
        alone = compute_keys(model, tok, arch, 1, REQS, [[template]])
        torch.testing.assert_close(rows[:, t], alone, atol=1e-5, rtol=1e-5)
    mean = torch.einsum("ntd,t->nd", rows.double(), template_weights(TEMPLATES))
    torch.testing.assert_close(mean, compute_keys(model, tok, arch, 1, REQS, TEMPLATES).double(), atol=1e-6, rtol=1e-6)
    assert (rows[:, 1:] - rows[:, :1]).abs().amax() > 1e-3       # the contexts do move the key


def _cloud(K, seed, spread=0.3):
    """Per-template keys around each column of K (d_in × n → d_in × n × T)."""
    g = torch.Generator().manual_seed(seed)
    return K[:, :, None] + spread * torch.randn(*K.shape, len(OMEGA), generator=g, dtype=K.dtype)


def _second_moment(Kt):
    cols = Kt.reshape(Kt.shape[0], -1) * OMEGA.repeat(Kt.shape[1]).sqrt()
    return cols @ cols.T


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_all_templates_rotation_solves_the_stacked_problem_and_remembers_the_cloud(polar_method):
    """Second edit, template_keys "all": Q = SciPy's rotation on
    [√(λ/N)·K0 | √μ·(K1_t·√ω) | K2_t·√(w·ω)] → [√(λ/N)·Q1ᵀ·K0 | same | K2*_t·√(w·ω)], K2*_t the reachable
    target of each context's key for its request's residual; E = Σ ω·k_t·k_tᵀ over both edits."""
    W0, K0, C0, K, resid = problem(50)
    resid = 0.3 * resid
    lam, mu, w = 3.0, 2.0, torch.tensor([1.0, 4.0], dtype=torch.float64)
    K1t, K2t = _cloud(K[:, :1], 1), _cloud(K[:, 1:3], 2)
    rule = MOSEInputRule(lam, polar_method=polar_method, retain="original", edit_memory=mu, template_keys="all")
    W = W0.clone()
    rule.prepare(0, W, C0)
    first = rule.update(0, W, K[:, :1], resid[:, :1], per_template=(K1t, OMEGA))
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:3], resid[:, 1:3], edit_weights=w, per_template=(K2t, OMEGA))
    Q1, Q = _dense(first.undo), _dense(res.undo)
    torch.testing.assert_close(W, W1 @ Q, atol=1e-12, rtol=0)

    cols = K2t.reshape(K2t.shape[0], -1)                                  # column j·T + t
    targets = reachable_key_targets(W1, cols, resid[:, 1:3].repeat_interleave(len(OMEGA), 1), _chol(C0), W0 @ W0.T)
    scale = (w.repeat_interleave(len(OMEGA)) * OMEGA.repeat(2)).sqrt()
    memory1 = K1t.reshape(K1t.shape[0], -1) * OMEGA.sqrt()
    root = (lam / N0) ** 0.5
    X = torch.cat([root * K0, mu ** 0.5 * memory1, cols * scale], 1)
    Y = torch.cat([root * (Q1.T @ K0), mu ** 0.5 * memory1, targets * scale], 1)
    torch.testing.assert_close(Q, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert res.objective == pytest.approx(float((Q @ X - Y).pow(2).sum()), rel=1e-9)
    torch.testing.assert_close(rule.memory[0], _second_moment(K1t) + _second_moment(K2t), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(W), torch.linalg.svdvals(W0), atol=0, rtol=1e-12)

    rule.revert(0, W, res.undo)                                           # undo takes the cloud back out
    torch.testing.assert_close(W, W1, atol=1e-12, rtol=0)
    torch.testing.assert_close(rule.memory[0], _second_moment(K1t), atol=1e-12, rtol=0)


def test_memory_templates_rotate_as_the_mean_key_and_remember_the_cloud():
    """template_keys "memory": the first edit's rotation is the mean-key rotation (same edit term);
    the memory then holds Σ ω·k_t·k_tᵀ, so the second edit's rotation differs."""
    W0, _, C0, K, resid = problem(51)
    resid = 0.3 * resid
    K1t, K2t = _cloud(K[:, :1], 3), _cloud(K[:, 1:3], 4)
    out = {}
    for mode in ("mean", "memory"):
        rule = MOSEInputRule(3.0, retain="original", edit_memory=2.0, template_keys=mode)
        W = W0.clone()
        rule.prepare(0, W, C0)
        first = rule.update(0, W, K[:, :1], resid[:, :1], per_template=(K1t, OMEGA))
        second = rule.update(0, W, K[:, 1:3], resid[:, 1:3], per_template=(K2t, OMEGA))
        out[mode] = (_dense(first.undo), _dense(second.undo), rule.memory[0].clone())
    torch.testing.assert_close(out["memory"][0], out["mean"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out["mean"][2], K[:, :3] @ K[:, :3].T, atol=1e-12, rtol=0)
    torch.testing.assert_close(out["memory"][2], _second_moment(K1t) + _second_moment(K2t), atol=1e-12, rtol=0)
    assert (out["memory"][1] - out["mean"][1]).abs().max() > 1e-6


def test_template_keys_options_and_inputs_are_checked():
    W0, _, C0, K, resid = problem(52)
    with pytest.raises(ValueError, match="template_keys='each'"):
        MOSEInputRule(3.0, template_keys="each")
    with pytest.raises(ValueError, match="needs edit_memory > 0"):
        MOSEInputRule(3.0, template_keys="memory")
    with pytest.raises(ValueError, match="bad rule_hparams for mose side=output"):
        make_rule(tiny_mose_config(rule_hparams={"side": "output", "template_keys": "all"}))
    rule = MOSEInputRule(3.0, edit_memory=1.0, template_keys="all")
    W = W0.clone()
    rule.prepare(0, W, C0)
    Kt = _cloud(K[:, :2], 5)
    bad_keys = Kt.clone()
    bad_keys[0, 0, 1] = float("nan")
    for per_template, match in ((None, "needs the per-template keys"),
                                ((Kt[:, :1], OMEGA), "per-template keys must be"),
                                ((Kt, OMEGA[:3]), "per-template keys must be"),
                                ((bad_keys, OMEGA), "non-finite per-template keys"),
                                ((Kt, -OMEGA), "template weights ≤ 0")):
        with pytest.raises(ValueError, match=match):
            rule.update(0, W, K[:, :2], resid[:, :2], per_template=per_template)
        assert torch.equal(W, W0) and float(rule.memory[0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="edit_weights"):
        rule.update(0, W, K[:, :2], resid[:, :2], edit_weights=[1.0], per_template=(Kt, OMEGA))
    assert torch.equal(W, W0)


def _editor(template_keys, **cfg):
    model, tok = make_tiny_model("llama")
    config = tiny_mose_config(lam=30.0, rule_hparams={"side": "input", "retain": "original", "edit_memory": 1.0,
                                                      "template_keys": template_keys}, **cfg)
    return MOSEEditor(model, tok, config, second_moments=tiny_second_moments(model, tok, config.layers),
                      progress=False)


@pytest.mark.model
def test_editor_passes_every_context_key_and_undo_is_exact():
    """The editor hands the rule every template's key: the memory after one edit is their second
    moment, recomputed here from the model before the edit; undo returns weights and memory."""
    editor = _editor("all")
    templates = editor.context_templates()
    assert sum(len(g) for g in templates) > 1
    editor._prepare()
    layer = editor.cfg.layers[0]
    rows = compute_template_keys(editor.model, editor.tok, editor.arch, layer, REQS, templates).double()
    W0 = {l: editor.weight(l).clone() for l in editor.cfg.layers}
    editor.edit(REQS)
    cols = rows.permute(2, 0, 1).reshape(rows.shape[2], -1) * template_weights(templates).repeat(len(REQS)).sqrt()
    torch.testing.assert_close(editor.rule.memory[layer], cols @ cols.T, atol=1e-9, rtol=1e-9)
    assert any(not torch.equal(editor.weight(l), W0[l]) for l in editor.cfg.layers)
    editor.undo(1)
    for l in editor.cfg.layers:
        torch.testing.assert_close(editor.weight(l), W0[l], atol=1e-6, rtol=0)
        assert float(editor.rule.memory[l].abs().max()) < 1e-9


@pytest.mark.model
def test_failure_at_a_later_layer_leaves_the_model_and_memory_untouched(monkeypatch):
    editor = _editor("all", land_retries=1)
    editor.edit(REQS[0])
    state = editor_state(editor)
    real, calls = mose_input.solve_polar, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:                    # the second layer of the edit
            raise RuntimeError("injected failure at the second layer")
        return real(*a, **k)
    monkeypatch.setattr(mose_input, "solve_polar", failing)
    with pytest.raises(RuntimeError, match="second layer"):
        editor.edit(REQS[1])
    assert_state_unchanged(editor, state)
    assert len(editor.records) == 1
