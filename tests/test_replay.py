"""Replaying earlier edits from their stored targets (``MOSEConfig.replay``): which requests are drawn,
that they are edited toward the z stored when they were edited, and that the bank of targets follows
undo, failure and a saved state bit for bit."""
import pytest
import torch

from conftest import fail_at_solve_call, make_tiny_model, tiny_mose_config, tiny_second_moments
from mose_fast import EditRequest, MOSEConfig, MOSEEditor
from mose_fast.hf.tokens import subject_last_index

A = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English",
                 target_true="French", case_id="a0"),
     EditRequest("The capital of France is", "France", "Rome", target_true="Paris", case_id="a1"),
     EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano", target_true="guitar", case_id="a2")]
B = [EditRequest("The Eiffel Tower is in", "The Eiffel Tower", "Rome", target_true="Paris", case_id="b0")]


def _editor(replay, seed=0):
    model, tok = make_tiny_model("llama", seed=seed)
    cfg = tiny_mose_config(replay=replay, lam=3.0, rule_hparams={"side": "input", "edit_memory": 2.0})
    return MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, cfg.layers), progress=False)


@torch.no_grad()
def _gaps(editor, requests, z):
    """‖z − h‖ with h the residual stream after the last edited block at the subject's last token of the
    bare prompt, from the model's own hidden states (float64)."""
    out = []
    for r, target in zip(requests, z):
        ids, pos = subject_last_index(editor.tok, r.template, r.subject)
        hs = editor.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        h = hs[editor.cfg.layers[-1] + 1][0, pos].to(torch.float64)
        out.append(float((target.to(torch.float64) - h).norm()))
    return out


@pytest.mark.model
def test_replay_draws_the_earlier_requests_farthest_from_their_targets_and_moves_them_closer():
    editor = _editor(replay=1)
    editor.edit(A)
    assert [r.case_id for r in editor._bank] == ["a0", "a1", "a2"] and editor._bank_z.shape[0] == 3
    gaps = _gaps(editor, editor._bank, editor._bank_z)
    # a pool of 4 × replay = 4 holds the whole bank of 3: the farthest is drawn
    farthest = A[max(range(3), key=gaps.__getitem__)].case_id
    record = editor.edit(B)
    assert record.replayed == [farthest]
    assert [r.case_id for r in editor._bank] == ["a0", "a1", "a2", "b0"]      # B once, not the replayed one
    assert len(record.target_unmet) == 1 and len(record.target_nll) == 1       # the records: B's requests only
    i = [r.case_id for r in A].index(farthest)
    after = _gaps(editor, [A[i]], editor._bank_z[i:i + 1])[0]
    # the same edit of B without replay, from the same state, leaves it farther from its target
    plain = _editor(replay=0)
    plain.edit(A)
    assert plain._bank == [] and plain._bank_z is None           # no bank kept without replay
    plain.edit(B)
    without = _gaps(plain, [A[i]], editor._bank_z[i:i + 1])[0]
    assert after < without and after < gaps[i], (after, without, gaps[i])


@pytest.mark.model
def test_the_bank_follows_undo_and_failure_and_a_saved_state_continues_bit_for_bit(monkeypatch, tmp_path):
    editor = _editor(replay=2)
    editor.edit(A)
    z_before = editor._bank_z.clone()
    state = {k: v.clone() for k, v in editor.state_dict().items()}
    assert set(k for k in state if k.startswith("replay.")) == {"replay.z", "replay.requests"}

    # a saved state (through safetensors) continues exactly as the editor itself does
    from safetensors.torch import load_file, save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "s.safetensors")
    resumed = _editor(replay=2)
    resumed.prepare()                    # statistics and context templates from the unedited model, as a run does
    resumed.load_state_dict(load_file(tmp_path / "s.safetensors"))
    assert [(r.prompt, r.subject, r.target_new, r.case_id) for r in resumed._bank] == \
        [(r.prompt, r.subject, r.target_new, r.case_id) for r in A]
    assert torch.equal(resumed._bank_z, z_before)
    rec_a, rec_b = editor.edit(B), resumed.edit(B)
    assert rec_a.replayed == rec_b.replayed and len(rec_a.replayed) == 2
    for l in editor.cfg.layers:
        assert torch.equal(editor.weight(l), resumed.weight(l)), l

    editor.undo()
    assert [r.case_id for r in editor._bank] == ["a0", "a1", "a2"] and torch.equal(editor._bank_z, z_before)
    fail_at_solve_call(monkeypatch, editor, 2, "injected failure")
    with pytest.raises(RuntimeError, match="injected"):
        editor.edit(B)
    assert [r.case_id for r in editor._bank] == ["a0", "a1", "a2"] and torch.equal(editor._bank_z, z_before)

    mismatched = dict(state, **{"replay.z": state["replay.z"][:2]})
    with pytest.raises(ValueError, match="replay.requests holds 3 requests, replay.z 2"):
        _editor(replay=2).load_state_dict(mismatched)


def test_replay_setting_is_checked_and_absent_at_zero():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="replay"):
            MOSEConfig(replay=bad).validate()
    assert "replay" not in MOSEConfig().to_dict()          # run folders made before it keep their identity
    assert MOSEConfig(replay=50).to_dict()["replay"] == 50
