"""Editor behaviour on tiny random models: adapters, all-or-nothing, undo, save, caches."""
import json

import pytest
import torch

from conftest import FAMILIES, make_tiny_model, tiny_mose_config, tiny_second_moments
from mose_fast import ARCHS, ArchSpec, EditRequest, MOSEEditor
from mose_fast.hf.arch import is_conv1d, resolve_arch
from mose_fast.eval.metrics import answer_nll
from mose_fast.memit.keys import block_outputs_at_subject
from mose_fast.memit.targets import compute_target

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")
REQ2 = EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball")


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
def test_failed_edit_leaves_weights_bit_identical(monkeypatch):
    editor, model, tok = make_editor(layers=[0, 1, 2])
    editor.edit(REQ2)   # a first, successful edit: the retention Grams exist and have moved
    before = all_weights(model)
    grams = {l: p.clone() for l, p in editor.rule.gram.items()}
    real_solve = editor.rule.solve
    calls = []

    def failing_solve(layer, A, V):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("injected failure in the third layer")
        return real_solve(layer, A, V)
    monkeypatch.setattr(editor.rule, "solve", failing_solve)
    with pytest.raises(RuntimeError, match="injected"):
        editor.edit(REQ)
    assert calls == [0, 1, 2]
    after = all_weights(model)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for l in grams:
        assert torch.equal(grams[l], editor.rule.gram[l])
    assert len(editor.records) == 1


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
def test_undo_restores_weights_and_gram(method):
    editor, model, tok = make_editor(polar_method=method)
    editor._prepare()
    W0 = {l: editor.arch.weight_view(model, l).clone() for l in editor.cfg.layers}
    P0 = {l: p.clone() for l, p in editor.rule.gram.items()}
    assert set(P0) == set(editor.cfg.layers)
    editor.edit(REQ)
    editor.edit(REQ2)
    editor.undo(1)
    editor.undo(1)
    for l in editor.cfg.layers:
        W = editor.arch.weight_view(model, l)
        # float32 rounding of 4 products: a few ulps of the largest entry
        assert float((W - W0[l]).abs().max()) <= 8 * torch.finfo(torch.float32).eps * float(W0[l].abs().max())
    with pytest.raises(ValueError, match="cannot undo"):
        editor.undo(1)
    assert not editor.records and [e["op"] for e in editor.journal] == ["edit", "edit", "undo", "undo"]
    for l, p in P0.items():
        torch.testing.assert_close(editor.rule.gram[l], p, rtol=1e-10, atol=1e-10 * float(p.abs().max()))


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
def test_save_reloads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM
    editor, model, tok = make_editor()
    editor.edit(REQ)
    out = editor.save(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for l in editor.cfg.layers:
        assert torch.equal(editor.arch.weight_view(reloaded, l), editor.arch.weight_view(model, l))
    journal = json.loads((out / "mose_journal.json").read_text())
    assert journal["config"]["layers"] == editor.cfg.layers
    assert journal["entries"][0]["requests"][0]["subject"] == "Danielle Darrieux"
    assert len(journal["entries"][0]["layers"]) == len(editor.cfg.layers)


@pytest.mark.model
def test_bf16_weights_use_float32_master():
    editor, model, tok = make_editor()
    model.to(torch.bfloat16)
    editor.edit(REQ)
    for l in editor.cfg.layers:
        master = editor._master[l]
        assert master.dtype == torch.float32
        assert torch.equal(editor.arch.weight_view(model, l), master.to(torch.bfloat16))


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
