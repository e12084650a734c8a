"""Editor behaviour on tiny random models: adapters on every family, all-or-nothing edits, undo
bit for bit, state_dict round trip, save, float32 masters."""
import json

import pytest
import torch

from mose_fast import ARCHS, ArchSpec, EditRequest, MOSEEditor
from mose_fast.hf.arch import is_conv1d, resolve_arch
from mose_fast.hf.scoring import answer_nll
from mose_fast.memit.keys import block_outputs_at_subject
from mose_fast.memit.targets import compute_target

from helpers import (
    FAMILIES,
    assert_state_unchanged,
    editor_state,
    fail_at_solve_call,
    make_tiny_model,
    tiny_mose_config,
    tiny_second_moments,
)

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")
REQ2 = EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")
REQ3 = EditRequest("The capital of France is", "France", "Rome", target_true="Paris")
# the rules the editor state tests run: the paper's rule, the input side with memory, an additive one
RULE_CONFIGS = {"output": {}, "input": {"rule_hparams": {"side": "input", "edit_memory": 1.0}},
                "alphaedit": {"method": "alphaedit", "rule_hparams": {"threshold": 0.05, "l2": 1.0}}}


def make_editor(family="llama", **cfg):
    model, tok = make_tiny_model(family)
    config = tiny_mose_config(**cfg)
    editor = MOSEEditor(model, tok, config, second_moments=tiny_second_moments(model, tok, config.layers),
                        progress=False)
    return editor, model, tok


def all_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_each_adapter_edits_its_tiny_model(family):
    editor, model, tok = make_editor(family)
    arch = ARCHS[family]
    before = all_weights(model)
    last = editor.cfg.layers[-1]
    # the editor's target z, recomputed independently (deterministic given the seed)
    z = compute_target(model, tok, arch, last, REQ, editor.context_templates(), editor.cfg).z
    h_before = block_outputs_at_subject(model, tok, arch, last, [REQ])[0]
    nll_before = answer_nll(model, tok, [REQ.text], [REQ.target_new])[0]
    Ws = {l: arch.weight_view(model, l).double().clone() for l in editor.cfg.layers}
    rec = editor.edit(REQ)
    h_after = block_outputs_at_subject(model, tok, arch, last, [REQ])[0]
    nll_after = answer_nll(model, tok, [REQ.text], [REQ.target_new])[0]
    # the residual stream moved towards the target, and the new answer became likelier
    assert float((h_after - z).norm()) < 0.75 * float((h_before - z).norm())
    assert nll_after < nll_before, (nll_before, nll_after)
    after = all_weights(model)
    edited = {arch.mlp_out_name(l) + ".weight" for l in editor.cfg.layers}
    for name in before:
        if name in edited:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed but is not an edited weight"
    for lr in rec.layers:
        W0, W1 = Ws[lr.layer], arch.weight_view(model, lr.layer).double()
        # W1 = R·W0 with R orthogonal: Gram of columns preserved, i.e. W1ᵀW1 = W0ᵀW0
        torch.testing.assert_close(W1.T @ W1, W0.T @ W0, atol=1e-4, rtol=1e-5)
        assert lr.orth_error <= 1e-10
        assert lr.objective <= lr.objective_identity
        assert lr.weight_norm_after == pytest.approx(lr.weight_norm_before, rel=1e-6)
    if family == "gpt2":
        assert is_conv1d(arch.mlp_out_module(model, 1))


@pytest.mark.model
@pytest.mark.parametrize("rule", sorted(RULE_CONFIGS))
def test_failed_edit_leaves_weights_and_rule_state_bit_identical(monkeypatch, rule):
    """A failure in the third layer's update (after it wrote its weights) puts every layer back and
    leaves the rule's state, the records and the undo history as after the first edit."""
    editor, model, tok = make_editor(layers=[0, 1, 2], **RULE_CONFIGS[rule])
    editor.edit(REQ2)   # a first, successful edit: the rule's state exists and has moved
    state = editor_state(editor)
    calls = fail_at_solve_call(monkeypatch, editor, 3, "injected failure in the third layer")
    with pytest.raises(RuntimeError, match="injected"):
        editor.edit(REQ)
    assert calls == [0, 1, 2]
    assert_state_unchanged(editor, state)
    assert len(editor.records) == 1 and editor.n_edits == 1
    assert [e["op"] for e in editor.journal] == ["edit"]
    monkeypatch.undo()
    editor.undo(1)                        # the undo history holds the first edit only
    with pytest.raises(ValueError, match="cannot undo"):
        editor.undo(1)


@pytest.mark.model
def test_bad_requests_raise_and_leave_model_untouched():
    editor, model, tok = make_editor()
    before = all_weights(model)
    with pytest.raises(ValueError, match="no edit requests"):
        editor.edit([])
    with pytest.raises(ValueError, match="expected EditRequest"):
        editor.edit([{"prompt": "x"}])
    with pytest.raises(ValueError, match="out of range"):
        MOSEEditor(model, tok, tiny_mose_config(layers=[1, 9]), second_moments={})
    for k, v in all_weights(model).items():
        assert torch.equal(before[k], v)


@pytest.mark.model
@pytest.mark.parametrize("method", ["svd", "subspace", "krylov", "polar_express"])
def test_undo_restores_weights_bit_for_bit_and_the_gram(method):
    editor, model, tok = make_editor(polar_method=method)
    editor.prepare()
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in editor.cfg.layers}
    P0 = {l: p.clone() for l, p in editor.rule.gram.items()}
    assert set(P0) == set(editor.cfg.layers)
    editor.edit(REQ)
    W1 = {l: editor.arch.weight_view(model, l).clone() for l in editor.cfg.layers}
    editor.edit(REQ2)
    editor.undo(1)
    for l in editor.cfg.layers:
        assert torch.equal(editor.arch.weight_view(model, l), W1[l]), l
    editor.undo(1)
    for l in editor.cfg.layers:
        assert torch.equal(editor.arch.weight_view(model, l), W0[l]), l
    with pytest.raises(ValueError, match="cannot undo"):
        editor.undo(1)
    assert not editor.records and [e["op"] for e in editor.journal] == ["edit", "edit", "undo", "undo"]
    for l, p in P0.items():
        torch.testing.assert_close(editor.rule.gram[l], p, rtol=1e-10, atol=1e-10 * float(p.abs().max()))


@pytest.mark.model
def test_undo_takes_the_edit_out_of_the_input_sides_state():
    """Input side: undo puts the cross Gram back to C0 (Q·Qᵀ = I, to rounding) and the edit's keys
    out of the memory (exactly: the columns are dropped)."""
    editor, model, tok = make_editor(**RULE_CONFIGS["input"])
    editor.prepare()
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in editor.cfg.layers}
    G0 = {l: g.clone() for l, g in editor.rule.cross.items()}
    editor.edit([REQ, REQ2])
    assert all(editor.rule.memory[l].shape[1] == 2 for l in editor.cfg.layers)
    editor.undo(1)
    for l in editor.cfg.layers:
        assert torch.equal(editor.arch.weight_view(model, l), W0[l]), l
        assert editor.rule.memory[l].shape[1] == 0
        torch.testing.assert_close(editor.rule.cross[l], G0[l], rtol=0, atol=1e-10 * float(G0[l].abs().max()))


@pytest.mark.model
def test_undo_history_is_bounded():
    editor, model, tok = make_editor(undo_history=1)
    editor.edit(REQ)
    editor.edit(REQ2)
    editor.undo(1)
    with pytest.raises(ValueError, match="cannot undo 1 edit.*undo_history=1"):
        editor.undo(1)
    assert editor.n_edits == 2 and [r.index for r in editor.records] == [0]


@pytest.mark.model
@pytest.mark.parametrize("method", ["svd", "subspace", "krylov", "polar_express"])
def test_retention_gram_tracks_rotated_weights(method):
    """P ← R·P·Rᵀ after each edit equals W·C0·Wᵀ recomputed from the edited weights."""
    model, tok = make_tiny_model("llama")
    config = tiny_mose_config(polar_method=method)
    C0 = tiny_second_moments(model, tok, config.layers)
    editor = MOSEEditor(model, tok, config, second_moments=C0, progress=False)
    editor.edit_sequential([REQ, REQ2, REQ])
    for l in config.layers:
        W = editor.arch.weight_view(model, l).double()
        ref = W @ C0[l] @ W.T
        torch.testing.assert_close(editor.rule.gram[l], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.model
def test_edit_is_deterministic_given_seed():
    e1, m1, _ = make_editor()
    e2, m2, _ = make_editor()
    e1.edit(REQ)
    e2.edit(REQ)
    for l in e1.cfg.layers:
        assert torch.equal(e1.arch.weight_view(m1, l), e2.arch.weight_view(m2, l))


@pytest.mark.model
@pytest.mark.parametrize("rule", ["output", "input"])
def test_state_dict_round_trip_continues_editing_alike(rule):
    """A fresh editor on the unedited model, prepared and then given another editor's state_dict,
    holds the same weights, rule state and edit count, and its next edit is the same bit for bit."""
    a, model_a, _ = make_editor(**RULE_CONFIGS[rule])
    a.edit(REQ)
    a.edit(REQ2)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    prefix = {"output": ["rule.P."], "input": ["rule.G.", "rule.K."]}[rule]
    # the input side's S = W·C0⁻¹·Wᵀ is state where the last edit moved it, else built again from W
    optional = {f"rule.S.{l}" for l in a.cfg.layers} if rule == "input" else set()
    assert set(state) - optional == {"n_edits"} | {f"{p}{l}" for l in a.cfg.layers for p in ["weight."] + prefix}
    b, model_b, _ = make_editor(**RULE_CONFIGS[rule])
    b.prepare()
    b.load_state_dict(state)
    assert b.n_edits == 2
    for k, v in b.state_dict().items():
        assert torch.equal(v, state[k]), k
    for name, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[name]), name
    a.edit(REQ3)
    b.edit(REQ3)
    for l in a.cfg.layers:
        assert torch.equal(a.weight(l), b.weight(l)), l
    with pytest.raises(ValueError, match="not an editor state"):
        b.load_state_dict({"n_edits": torch.tensor(1)})


@pytest.mark.model
def test_save_reloads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM
    editor, model, tok = make_editor()
    editor.edit(REQ)
    out = editor.save(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for l in editor.cfg.layers:
        assert torch.equal(editor.arch.weight_view(reloaded, l), editor.arch.weight_view(model, l))
    saved = reloaded.state_dict()
    for name, v in model.state_dict().items():
        assert torch.equal(saved[name], v), name
    assert (answer_nll(reloaded, tok, [REQ.text], [REQ.target_new])
            == answer_nll(model, tok, [REQ.text], [REQ.target_new]))
    journal = json.loads((out / "mose_journal.json").read_text())
    assert journal["config"]["layers"] == editor.cfg.layers
    assert journal["entries"][0]["requests"][0]["subject"] == "Danielle Darrieux"
    assert len(journal["entries"][0]["layers"]) == len(editor.cfg.layers)


@pytest.mark.model
def test_bf16_weights_use_float32_master_and_undo_restores_both():
    editor, model, tok = make_editor()
    model.to(torch.bfloat16)
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in editor.cfg.layers}
    editor.edit(REQ)
    for l in editor.cfg.layers:
        master = editor._master[l]
        assert master.dtype == torch.float32
        assert torch.equal(editor.arch.weight_view(model, l), master.to(torch.bfloat16))
        assert not torch.equal(editor.arch.weight_view(model, l), W0[l])
    assert {f"master.{l}" for l in editor.cfg.layers} <= set(editor.state_dict())
    editor.undo()
    for l in editor.cfg.layers:
        assert torch.equal(editor.arch.weight_view(model, l), W0[l]), l
        assert torch.equal(editor._master[l], W0[l].float()), l


def test_unknown_family_is_a_clear_error():
    class Cfg:
        model_type = "mamba"

    class Fake(torch.nn.Module):
        config = Cfg()
    with pytest.raises(ValueError, match=r"unsupported model family 'mamba'.*supported.*ArchSpec"):
        resolve_arch(Fake())


@pytest.mark.model
def test_arch_by_hand():
    model, tok = make_tiny_model("llama")
    spec = ArchSpec(layers="model.layers", mlp_out="mlp.down_proj", mlp_in=("mlp.up_proj",),
                    ln_f="model.norm", lm_head="lm_head")
    assert resolve_arch(model, spec) is spec
    with pytest.raises(ValueError, match="not found"):
        resolve_arch(model, ArchSpec(layers="model.blocks", mlp_out="mlp.down_proj", mlp_in=(),
                                     ln_f="model.norm", lm_head="lm_head"))


@pytest.mark.model
def test_no_undo_history_keeps_no_copies():
    editor, _, _ = make_editor(undo_history=0)
    editor.edit(REQ)
    editor.edit(REQ2)
    assert len(editor._undo) == 0
    with pytest.raises(ValueError, match="0 can be undone"):
        editor.undo(1)


@pytest.mark.model
def test_load_weights_refuses_a_state_of_another_shape_and_leaves_the_model_untouched():
    editor, model, _ = make_editor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() + 1 for k, v in editor.weights_dict().items()}     # a write would show
    last = f"weight.{editor.cfg.layers[-1]}"
    state[last] = state[last][:, :-1]                  # every matrix but the last one would fit
    with pytest.raises(ValueError, match=f"does not fit this model: {last}"):
        editor.load_weights(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.model
@pytest.mark.parametrize("modules", [("mlp.down",), ("attn.v", "mlp.in", "mlp.down")])
def test_keys_replaying_unchanged_blocks_give_the_edit_of_full_forwards(modules):
    """The editor's keys forwards start at the first changed block (memit.keys.SubjectForward); in
    float64 the edit is the one full forwards give, across units of several modules and a re-solve."""
    results = []
    for replay in (True, False):
        model, tok = make_tiny_model("llama")
        model.double()
        config = tiny_mose_config(layers=[1, 2, 3], modules=modules, land_retries=1,
                                  rule_hparams={"side": "input", "edit_memory": 1.0})
        editor = MOSEEditor(model, tok, config, second_moments=tiny_second_moments(model, tok, config.layers),
                            progress=False)
        editor._subject_replay = None if replay else False
        rec = editor.edit([REQ, REQ2])
        assert editor._subject_replay is (True if replay else False)
        # mlp.down's blocks patched from the projection's captures (checked once), not computed again
        assert editor._subject_patch is (True if replay else None)
        results.append((rec, {k: v.clone() for k, v in model.state_dict().items()}))
    (rec_a, a), (rec_b, b) = results
    assert rec_a.attempts == rec_b.attempts == 2          # a re-solve: the first unit's record rewound
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-10, rtol=1e-10, msg=name)
    torch.testing.assert_close(torch.tensor(rec_a.target_unmet), torch.tensor(rec_b.target_unmet), atol=1e-8, rtol=1e-8)
