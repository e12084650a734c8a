"""The MOSE rules on small synthetic problems.

Output side (``MOSERule``, W ← R·W, the paper): keeps the current model's outputs on the corpus
keys.  Input side (``MOSEInputRule``, W ← W·Q): keeps the unedited model's outputs (cross Gram
G = Q_totᵀ·C0) and, with edit memory μ, every earlier edit's keys where they are.  Each rotation is
checked against SciPy's orthogonal Procrustes on the stacked problem, the input side's reachable key
targets against an independent KKT solve; then the Rule interface (update leaves the state alone,
commit folds it in, undo takes it out, state_dict round trip), ``lam_unit`` and ``make_rule``."""
import numpy as np
import pytest
import torch

from mose_fast.rules import MOSEInputRule, MOSERule, Rotation, make_rule
from mose_fast.rules.mose_input import PREIMAGE_RIDGE, InputRecord, reachable_key_targets
from mose_fast.rules.mose_output import OutputRecord

from helpers import D_IN, D_OUT, N0, tiny_mose_config
from helpers import ridged_cholesky as _chol
from helpers import scipy_rotation as _scipy_rotation
from helpers import synthetic_problem as problem


def _kkt_shift(W, C0, r):
    """argmin dᵀ·C0·d subject to W·d = r, from the KKT system [[C0, Wᵀ], [W, 0]]·[d; ν] = [0; r]."""
    n_in, n_out = W.shape[1], W.shape[0]
    kkt = torch.zeros(n_in + n_out, n_in + n_out, dtype=W.dtype)
    kkt[:n_in, :n_in], kkt[:n_in, n_in:], kkt[n_in:, :n_in] = C0, W.T, W
    rhs = torch.cat([torch.zeros(n_in, r.shape[1], dtype=W.dtype), r])
    return torch.linalg.solve(kkt, rhs)[:n_in]


def _null_projector(W):
    _, S, Vh = torch.linalg.svd(W)              # rows of Vh beyond rank(W) span null(W)
    N = Vh[int((S > 1e-12 * S[0]).sum()):].T
    return N @ N.T


def _dense(record) -> torch.Tensor:
    return record.rotation.dense()


def _rotation(d, scale, seed):
    S = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.matrix_exp(scale * (S - S.T))


# --- output side ------------------------------------------------------------------------------------

@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_output_rotation_solves_the_stacked_procrustes_problem(polar_method):
    """Two sequential edits, the first committed; the second rotation equals SciPy's on the stacked
    problem [√(λ/N)·W1·K0 | A2] → [√(λ/N)·W1·K0 | V2] (retain the current model W1), the reported
    objective is that problem's value at R, and the committed Gram is W·C0·Wᵀ of the edited W."""
    W0, K0, C0, K, resid = problem(20)
    lam = 3.0
    rule = MOSERule(lam, polar_method=polar_method)
    W = W0.clone()
    rule.prepare(0, W, C0)
    rule.commit(0, rule.update(0, W, K[:, :1], resid[:, :1]).undo)
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:3], resid[:, 1:3])
    assert isinstance(res.undo, OutputRecord)
    R = _dense(res.undo)
    torch.testing.assert_close(W, R @ W1, atol=1e-12, rtol=0)
    w = (lam / N0) ** 0.5
    A2 = W1 @ K[:, 1:3]
    V2 = A2 + resid[:, 1:3]
    X = torch.cat([w * W1 @ K0, A2], 1)
    Y = torch.cat([w * W1 @ K0, V2], 1)
    torch.testing.assert_close(R, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert res.objective == pytest.approx(float((R @ X - Y).pow(2).sum()), rel=1e-9)
    assert res.objective_identity == pytest.approx(float((X - Y).pow(2).sum()), rel=1e-9)
    assert res.objective < res.objective_identity
    assert res.orth_error <= 1e-12
    rule.commit(0, res.undo)
    ref = W @ C0 @ W.T
    torch.testing.assert_close(rule.gram[0], ref, atol=1e-10 * float(ref.abs().max()), rtol=0)


def test_with_nothing_to_edit_the_output_side_keeps_a_drifted_model_and_the_input_side_pulls_it_back():
    """resid = 0 after the weights drifted by a committed rotation: the output side retains the
    current model and leaves W alone; the input side retains the unedited model and rotates W back
    towards W0 on the corpus keys (not all the way: the edit term asks to keep the drifted key)."""
    W0, K0, C0, K, _ = problem(21)
    zero = torch.zeros(D_OUT, 1, dtype=torch.float64)

    out = MOSERule(10.0)
    W = W0.clone()
    out.prepare(0, W, C0)
    drift = _rotation(D_OUT, 0.2, 1)
    out.commit(0, OutputRecord(Rotation(R=drift)))       # as if an edit had rotated W by `drift`
    W.copy_(drift @ W0)
    before = float((W @ K0 - W0 @ K0).norm())
    out.update(0, W, K[:, :1], zero)
    assert float((W @ K0 - W0 @ K0).norm()) == pytest.approx(before, rel=1e-9)

    inp = MOSEInputRule(10.0)
    W = W0.clone()
    inp.prepare(0, W, C0)
    drift = _rotation(D_IN, 0.2, 2)
    inp.commit(0, InputRecord(Rotation(R=drift), None))
    torch.testing.assert_close(inp.cross[0], drift.T @ C0, atol=1e-12, rtol=0)   # G = Q_totᵀ·C0
    W.copy_(W0 @ drift)
    before = float((W @ K0 - W0 @ K0).norm())
    inp.update(0, W, K[:, :1], zero)
    assert float((W @ K0 - W0 @ K0).norm()) < 0.2 * before


# --- input side: the reachable key targets --------------------------------------------------------

def test_reachable_key_targets_meet_the_output_at_the_keys_norm():
    W, _, C0, K, resid = problem(30)
    resid = 0.3 * resid
    got = reachable_key_targets(W, K, resid, _chol(C0), W @ W.T)
    torch.testing.assert_close(W @ got, W @ K + resid, atol=1e-10, rtol=0)            # hits v_E
    torch.testing.assert_close(got.norm(dim=0), K.norm(dim=0), atol=0, rtol=1e-12)   # a rotation can reach it
    # and it is the corpus-cheapest shift, moved along null(W) by the smaller root t
    shifted = K + _kkt_shift(W, C0, resid)
    Pn = _null_projector(W)
    for j in range(K.shape[1]):
        n = Pn @ shifted[:, j]
        # ‖shifted − t·n‖² = ‖k‖²:  ‖n‖²·t² − 2·(n·shifted)·t + ‖shifted‖² − ‖k‖² = 0
        roots = np.roots([float(n @ n), -2 * float(n @ shifted[:, j]),
                          float(shifted[:, j] @ shifted[:, j] - K[:, j] @ K[:, j])])
        assert np.isreal(roots).all()
        t = min(roots.real, key=abs)
        torch.testing.assert_close(got[:, j], shifted[:, j] - t * n, atol=1e-9, rtol=0)


def test_unreachable_norm_falls_back_to_the_minimum_norm_preimage():
    """A residual so large that no key of norm ‖k‖ maps to v_E: the closest-norm preimage is
    W⁺·v_E (nothing left along null(W)), and W·K* = v_E still holds."""
    W, _, C0, K, resid = problem(31)
    resid = 50.0 * resid
    got = reachable_key_targets(W, K, resid, _chol(C0), W @ W.T)
    want = torch.linalg.pinv(W) @ (W @ K + resid)
    assert (want.norm(dim=0) > K.norm(dim=0)).all()           # unreachable indeed
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_with_nothing_retained_the_input_rotation_puts_the_key_on_its_reachable_target():
    """λ = 0, one key: Q·k is the KKT shift for dᵀ·(C0 + ρ·I)·d (ρ the rule's ridge) brought back
    to ‖k‖ along null(W), and W·Q·k meets the target output."""
    W0, _, C0, K, resid = problem(35)
    k, r = K[:, :1], 0.3 * resid[:, :1]
    ridge = PREIMAGE_RIDGE * float(torch.trace(C0)) / C0.shape[0]
    shifted = k + _kkt_shift(W0, C0 + ridge * torch.eye(C0.shape[0], dtype=C0.dtype), r)
    n = _null_projector(W0) @ shifted
    roots = np.roots([float((n * n).sum()), -2 * float((n * shifted).sum()),
                      float((shifted * shifted).sum() - (k * k).sum())])
    want = shifted - min(roots.real, key=abs) * n
    rule = MOSEInputRule(0.0)
    W = W0.clone()
    rule.prepare(0, W, C0)
    Q = _dense(rule.update(0, W, k, r).undo)
    torch.testing.assert_close(W @ k, W0 @ k + r, atol=1e-9, rtol=0)
    torch.testing.assert_close(Q @ k, want, atol=1e-9, rtol=0)


# --- input side: the rotation ---------------------------------------------------------------------

@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
@pytest.mark.parametrize("mu", [0.0, 2.0])
def test_input_rotation_solves_the_stacked_procrustes_problem(mu, polar_method):
    """Two sequential edits, the first committed; the second rotation Q equals SciPy's on the
    stacked key-space problem [√(λ/N)·K0 | √μ·K1 | K2] → [√(λ/N)·Q1ᵀ·K0 | √μ·K1 | K2*] (retain the
    unedited model, and the first edit's key where it is), W becomes W1·Q, and the singular values
    of W never move."""
    W0, K0, C0, K, resid = problem(32)
    resid = 0.3 * resid
    lam = 3.0
    rule = MOSEInputRule(lam, polar_method=polar_method, edit_memory=mu)
    W = W0.clone()
    rule.prepare(0, W, C0)
    first = rule.update(0, W, K[:, :1], resid[:, :1])
    rule.commit(0, first.undo)
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:3], resid[:, 1:3])
    assert isinstance(res.undo, InputRecord)
    Q1 = _dense(first.undo)
    Q = _dense(res.undo)
    torch.testing.assert_close(W, W1 @ Q, atol=1e-12, rtol=0)
    K2 = K[:, 1:3]
    K2_target = reachable_key_targets(W1, K2, resid[:, 1:3], _chol(C0), W0 @ W0.T)
    w = (lam / N0) ** 0.5
    X = torch.cat([w * K0, mu ** 0.5 * K[:, :1], K2], 1)
    Y = torch.cat([w * (Q1.T @ K0), mu ** 0.5 * K[:, :1], K2_target], 1)
    torch.testing.assert_close(Q, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert res.objective == pytest.approx(float((Q @ X - Y).pow(2).sum()), rel=1e-9)
    assert res.objective < res.objective_identity == pytest.approx(float((X - Y).pow(2).sum()), rel=1e-9)
    torch.testing.assert_close(torch.linalg.svdvals(W), torch.linalg.svdvals(W0), atol=0, rtol=1e-12)


def test_input_rotation_edits_where_the_output_rotation_cannot():
    """A target of another norm: the output-side rotation keeps ‖W·k‖ and misses it; the
    input-side one meets it exactly (λ = 0: nothing else to keep)."""
    W, _, C0, K, resid = problem(33)
    k, r = K[:, :1], 0.3 * resid[:, :1]
    out, inp = W.clone(), W.clone()
    for rule, M in ((MOSERule(0.0), out), (MOSEInputRule(0.0), inp)):
        rule.prepare(0, M, C0)
        rule.update(0, M, k, r)
    v = W @ k + r
    assert float((out @ k).norm()) == pytest.approx(float((W @ k).norm()), rel=1e-12)
    assert float((out @ k - v).norm()) > 0.01 * float(r.norm())
    torch.testing.assert_close(inp @ k, v, atol=1e-9, rtol=0)


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_memory_cap_scales_the_memory_weight_once_it_binds(polar_method):
    """With memory_cap c the second edit solves the stacked problem with the memory column weighted
    √μ_eff, μ_eff = c·λ·tr(C0)/‖K1‖² (the cap binds: set to half of μ·tr(E)/λ·tr(C0)); a cap above
    that ratio leaves the rule as without a cap."""
    W0, K0, C0, K, resid = problem(35)
    resid = 0.3 * resid
    lam, mu = 3.0, 2.0
    ratio = mu * float(K[:, :1].pow(2).sum()) / (lam * float(torch.trace(C0)))   # after the first edit
    rotations = {}
    for cap in (None, 2.0 * ratio, 0.5 * ratio):
        rule = MOSEInputRule(lam, polar_method=polar_method, edit_memory=mu, memory_cap=cap)
        W = W0.clone()
        rule.prepare(0, W, C0)
        first = rule.update(0, W, K[:, :1], resid[:, :1])     # empty memory: no cap acts
        rule.commit(0, first.undo)
        W1 = W.clone()
        if cap == 0.5 * ratio:
            assert rule.memory_weight(0) == pytest.approx(mu / 2, rel=1e-12)
        rotations[cap] = (_dense(rule.update(0, W, K[:, 1:3], resid[:, 1:3]).undo), W1, _dense(first.undo))
    torch.testing.assert_close(rotations[2.0 * ratio][0], rotations[None][0], atol=1e-12, rtol=0)
    Q, W1, Q1 = rotations[0.5 * ratio]
    mu_eff = 0.5 * ratio * lam * float(torch.trace(C0)) / float(K[:, :1].pow(2).sum())
    assert mu_eff == pytest.approx(mu / 2, rel=1e-12)
    K2_target = reachable_key_targets(W1, K[:, 1:3], resid[:, 1:3], _chol(C0), W0 @ W0.T)
    w = (lam / N0) ** 0.5
    X = torch.cat([w * K0, mu_eff ** 0.5 * K[:, :1], K[:, 1:3]], 1)
    Y = torch.cat([w * (Q1.T @ K0), mu_eff ** 0.5 * K[:, :1], K2_target], 1)
    torch.testing.assert_close(Q, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert (Q - rotations[None][0]).abs().max() > 1e-6      # the cap changed the rotation


def test_memory_cap_is_checked():
    with pytest.raises(ValueError, match="memory_cap"):
        MOSEInputRule(3.0, edit_memory=0.0, memory_cap=10.0)
    with pytest.raises(ValueError, match="memory_cap"):
        MOSEInputRule(3.0, edit_memory=1.0, memory_cap=-1.0)
    with pytest.raises(ValueError, match="memory_cap"):
        make_rule(tiny_mose_config(rule_hparams={"side": "output", "memory_cap": 1.0}))


# --- the Rule interface: update, commit, undo, state_dict -------------------------------------------

def _rule(side, polar_method, lam=3.0):
    if side == "output":
        return MOSERule(lam, polar_method=polar_method)
    return MOSEInputRule(lam, polar_method=polar_method, edit_memory=1.0)


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
@pytest.mark.parametrize("side", ["output", "input"])
def test_update_leaves_the_state_commit_folds_it_in_and_undo_takes_it_out(side, polar_method):
    W0, K0, C0, K, resid = problem(34)
    rule = _rule(side, polar_method)
    W = W0.clone()
    rule.prepare(0, W, C0)
    first = rule.update(0, W, K[:, :1], 0.3 * resid[:, :1])
    rule.commit(0, first.undo)
    state = {k: v.clone() for k, v in rule.state_dict().items()}
    # at these widths every rotation rebuilds S = W·C0⁻¹·Wᵀ at the next edit rather than moving it
    assert set(state) == ({"P.0"} if side == "output" else {"G.0", "K.0"})
    if side == "input":         # the memory holds the kept edit's keys as columns
        assert torch.equal(state["K.0"], K[:, :1].float())          # float32 keys, held exactly
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:2], 0.3 * resid[:, 1:2])
    assert not torch.equal(W, W1)
    after = rule.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)           # update: state untouched
    R = _dense(res.undo)
    rule.commit(0, res.undo)
    if side == "output":        # P ← R·P·Rᵀ: W·C0·Wᵀ of the edited W
        ref = W @ C0 @ W.T
        torch.testing.assert_close(rule.gram[0], ref, atol=1e-10 * float(ref.abs().max()), rtol=0)
    else:                       # G ← Qᵀ·G; the keys join the memory
        torch.testing.assert_close(rule.cross[0], R.T @ state["G.0"], atol=1e-12, rtol=0)
        assert torch.equal(rule.memory[0], K[:, :2].float())          # float32 keys, held exactly
    rule.undo(0, res.undo)
    after = rule.state_dict()
    for k in state:
        torch.testing.assert_close(after[k], state[k], atol=1e-12 * float(state[k].abs().max()), rtol=0)
    if side == "input":
        assert torch.equal(after["K.0"], state["K.0"])


@pytest.mark.parametrize("side", ["output", "input"])
def test_state_dict_round_trip_edits_alike(side):
    """A resumed run prepares the rule on the unedited weights and then loads the saved state: its
    next edit is the one the rule that made the state makes, bit for bit.  Loaded before prepare(),
    the state is kept through it (the input side's W·Wᵀ is then formed from the edited W: equal up
    to rounding)."""
    W0, _, C0, K, resid = problem(36)
    rule = _rule(side, "svd")
    W = W0.clone()
    rule.prepare(0, W, C0)
    rule.commit(0, rule.update(0, W, K[:, :1], 0.3 * resid[:, :1]).undo)
    state = {k: v.clone() for k, v in rule.state_dict().items()}
    resumed, loaded_first = _rule(side, "svd"), _rule(side, "svd")
    resumed.prepare(0, W0, C0)
    resumed.load_state_dict(state)
    loaded_first.load_state_dict(state)
    loaded_first.prepare(0, W, C0)
    for r in (resumed, loaded_first):
        assert set(r.state_dict()) == set(state) and all(torch.equal(r.state_dict()[k], state[k]) for k in state)
    Wa, Wb, Wc = W.clone(), W.clone(), W.clone()
    rule.update(0, Wa, K[:, 1:3], 0.3 * resid[:, 1:3])
    resumed.update(0, Wb, K[:, 1:3], 0.3 * resid[:, 1:3])
    loaded_first.update(0, Wc, K[:, 1:3], 0.3 * resid[:, 1:3])
    assert torch.equal(Wa, Wb)
    torch.testing.assert_close(Wc, Wa, atol=1e-12, rtol=0)
    assert not torch.equal(Wa, W)
    other = MOSEInputRule(1.0) if side == "output" else MOSERule(1.0)
    with pytest.raises(ValueError, match="not a MOSE"):
        other.load_state_dict(state)


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["output", "input"])
def test_lam_unit_per_dim_is_absolute_lam_times_the_rotated_dimension(side):
    W0, _, C0, K, resid = problem(37)
    lam, d = 0.25, (D_OUT if side == "output" else D_IN)
    cls = MOSERule if side == "output" else MOSEInputRule
    per_dim, absolute = cls(lam, lam_unit="per_dim"), cls(lam * d)
    out = {}
    for name, rule in (("per_dim", per_dim), ("absolute", absolute)):
        W = W0.clone()
        rule.prepare(0, W, C0)
        rule.update(0, W, K, 0.3 * resid)
        out[name] = W
    assert per_dim.lam_for(0) == absolute.lam_for(0) == lam * d
    assert torch.equal(out["per_dim"], out["absolute"])
    W = W0.clone()                                  # and it is not the absolute λ itself
    plain = cls(lam)
    plain.prepare(0, W, C0)
    plain.update(0, W, K, 0.3 * resid)
    assert float((W - out["absolute"]).abs().max()) > 1e-6


def test_make_rule_picks_the_side_and_passes_the_options():
    rule = make_rule(tiny_mose_config(lam=2.0, rule_hparams={"side": "input", "edit_memory": 0.5,
                                                             "memory_cap": 3.0, "lam_unit": "per_dim"}))
    assert isinstance(rule, MOSEInputRule)
    assert (rule.lam, rule.edit_memory, rule.memory_cap, rule.lam_unit) == (2.0, 0.5, 3.0, "per_dim")
    assert (rule.polar_method, rule.solve_dtype) == ("svd", torch.float64)
    rule = make_rule(tiny_mose_config(rule_hparams={"side": "output"}, solve_dtype="float32"))
    assert type(rule) is MOSERule and rule.solve_dtype == torch.float32
    assert type(make_rule(tiny_mose_config(rule_hparams={}))) is MOSERule       # output is the rule's default
    with pytest.raises(ValueError, match="side"):
        make_rule(tiny_mose_config(rule_hparams={"side": "both"}))


@pytest.mark.parametrize("option", ["retain", "match_norms", "template_keys", "null_space", "preimage_ridge"])
def test_removed_options_are_refused_by_name(option):
    for side in ("output", "input"):
        with pytest.raises(ValueError, match=f"unknown option.*{option}"):
            make_rule(tiny_mose_config(rule_hparams={"side": side, option: 1}))


def test_bad_mose_options_raise():
    with pytest.raises(ValueError, match="edit_memory"):
        MOSEInputRule(1.0, edit_memory=-1.0)
    with pytest.raises(ValueError, match="input-side options"):
        MOSERule(1.0, edit_memory=1.0)
    with pytest.raises(ValueError, match="lam_unit"):
        MOSERule(1.0, lam_unit="per_token")
    with pytest.raises(ValueError, match="λ must be ≥ 0"):
        MOSERule(-1.0)
    with pytest.raises(ValueError, match="λ must be ≥ 0"):
        MOSEInputRule(-1.0)
    with pytest.raises(ValueError, match="side='input'"):
        MOSERule(1.0, side="input")
    with pytest.raises(ValueError, match="side='output'"):
        MOSEInputRule(1.0, side="output")


def test_rank_deficient_statistics_raise_the_ridge_until_cholesky_succeeds(caplog):
    """C0 from fewer tokens than its width: the ridge grows (with a warning) and L·Lᵀ is C0 plus that
    ridge; statistics that no ridge up to 1e-3 rescues are refused, naming the layer."""
    from mose_fast.rules.mose_input import ridged_cholesky
    g = torch.Generator().manual_seed(0)
    K = torch.randn(40, 8, generator=g, dtype=torch.float64)        # rank 8 in 40 dimensions
    C = K @ K.T / 8
    C[0, 0] -= 1e-3 * float(torch.trace(C)) / 40                      # rounding made it indefinite
    ref = C.clone()
    with caplog.at_level("WARNING"):
        L = ridged_cholesky(C, float(torch.trace(ref)) / 40, "layer 3")
    ridge = float((L @ L.T - ref).diagonal().mean())
    assert "rank deficient" in caplog.text and ridge > 1e-8 * float(torch.trace(ref)) / 40
    torch.testing.assert_close(L @ L.T, ref + ridge * torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="layer 7"):
        ridged_cholesky(-torch.eye(5, dtype=torch.float64), 1.0, "layer 7")


@pytest.mark.parametrize("by_change", [True, False], ids=["moved", "rebuilt"])
@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_preimage_gram_follows_the_rotations_and_their_undo(polar_method, by_change, monkeypatch):
    """S = W·C0⁻¹·Wᵀ kept over 30 kept edits — moved by their low-rank changes, or dropped at each
    commit and built again from the rotated W at the next edit — equals S computed from the rotated
    W (relative 1e-9), the targets from the kept S equal those from the direct formula, and undoing
    the edits brings S back."""
    from mose_fast.rules import MOSEInputRule, mose_input
    from mose_fast.rules.mose_input import preimage_gram, reachable_key_targets
    monkeypatch.setattr(mose_input, "gram_by_change", lambda *shape: by_change)
    W0, _, C0, K, resid = problem(50)
    rule = MOSEInputRule(3.0, polar_method=polar_method, edit_memory=1.0)
    W = W0.clone()
    rule.prepare(0, W, C0)
    g = torch.Generator().manual_seed(5)
    records = []
    for i in range(30):
        k = torch.randn(W.shape[1], 2, generator=g, dtype=torch.float64)
        r = 0.2 * torch.randn(W.shape[0], 2, generator=g, dtype=torch.float64)
        if i == 29 and by_change:    # the targets an edit uses: from the kept S, as from a fresh one
            direct = reachable_key_targets(W, k, r, rule.chol[0], rule.wwt[0])
            kept = reachable_key_targets(W, k, r, rule.chol[0], rule.wwt[0], rule.sgram[0])
            torch.testing.assert_close(kept, direct, rtol=1e-9, atol=1e-9)
        Wi = W.clone()
        res = rule.update(0, W, k, r)
        if not by_change:              # built by this update from the weights it found (not state)
            fresh = preimage_gram(Wi, rule.chol[0])
            assert float((rule._built[0] - fresh).norm() / fresh.norm()) < 1e-12
            assert "S.0" not in rule.state_dict()
        rule.commit(0, res.undo)
        assert (0 in rule.sgram) == by_change
        records.append(res.undo)

    def kept_or_built(W_now):          # S as the next edit of W_now uses it
        if 0 not in rule.sgram:
            rule.update(0, W_now.clone(), K[:, :1], 0 * resid[:, :1])
            return rule._built.pop(0)
        return rule.sgram[0]
    fresh = preimage_gram(W, rule.chol[0])
    assert float((kept_or_built(W) - fresh).norm() / fresh.norm()) < 1e-9
    for rec in reversed(records):
        rule.undo(0, rec)
        assert (0 in rule.sgram) == by_change
    first = preimage_gram(W0, rule.chol[0])
    assert float((kept_or_built(W0) - first).norm() / first.norm()) < 1e-9


def test_gram_by_change_at_smollm2_widths():
    """Moving S costs ≈ 2·d_in²·k, building it d_in²·d_out: a batch of 1 (k = 66) moves it, a batch of
    10 (k = 660) builds it again (d_in = 1536, d_out = 576); a dense rotation (k = d_in) always rebuilds."""
    from mose_fast.rules.mose_input import gram_by_change
    assert gram_by_change(1536, 576, 66)
    assert not gram_by_change(1536, 576, 660)
    assert not gram_by_change(20, 12, 20)
    assert gram_by_change(13824, 5120, 66) and not gram_by_change(13824, 5120, 13824)


# --- input side: the edit memory stays at most d columns ---------------------------------------------

def test_compress_memory_keeps_the_product_in_d_columns():
    from mose_fast.rules.mose_input import compress_memory
    g = torch.Generator().manual_seed(7)
    F = torch.randn(20, 50, generator=g, dtype=torch.float64).float()
    C = compress_memory(F)
    assert C.shape == (20, 20) and C.dtype == torch.float32 and torch.equal(C, C.tril())
    ref = F.double() @ F.double().T
    torch.testing.assert_close(C.double() @ C.double().T, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    narrow = F[:, :20]
    assert compress_memory(narrow) is narrow                  # ≤ d columns: the keys themselves


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
def test_memory_of_more_edits_than_dimensions_is_compressed_and_solves_the_stacked_problem(polar_method):
    """Nine edits of 3 keys (27 > d_in = 20 columns): the memory holds a d × d factor, the tenth edit's
    rotation is SciPy's on the stacked problem with every earlier key (to float32 rounding of the
    factor), and undoing the commit that compressed puts the uncompressed memory back bit for bit."""
    W0, K0, C0, _, _ = problem(36)
    g = torch.Generator().manual_seed(8)
    lam, mu = 3.0, 0.5
    rule = MOSEInputRule(lam, polar_method=polar_method, edit_memory=mu)
    W = W0.clone()
    rule.prepare(0, W, C0)
    keys, rotations, records = [], [], []
    for i in range(9):
        K = torch.randn(D_IN, 3, generator=g, dtype=torch.float64).float().double()
        resid = 0.3 * torch.randn(D_OUT, 3, generator=g, dtype=torch.float64)
        before = {k: v.clone() for k, v in rule.state_dict().items()}
        res = rule.update(0, W, K, resid)
        rule.commit(0, res.undo)
        keys.append(K)
        rotations.append(_dense(res.undo))
        records.append((res.undo, before))
    assert rule.memory[0].shape == (D_IN, D_IN)
    compressing = [i for i, (rec, _) in enumerate(records) if rec.memory_before is not None]
    assert compressing == [6, 7, 8]                          # 21, 24, 27 columns > 20
    K_all = torch.cat(keys, 1)
    E = K_all @ K_all.T
    torch.testing.assert_close(rule.memory[0].double() @ rule.memory[0].double().T, E,
                               atol=1e-5 * float(E.abs().max()), rtol=0)
    W9 = W.clone()
    K10 = torch.randn(D_IN, 2, generator=g, dtype=torch.float64).float().double()
    r10 = 0.3 * torch.randn(D_OUT, 2, generator=g, dtype=torch.float64)
    Q = _dense(rule.update(0, W, K10, r10).undo)
    Q_tot = torch.linalg.multi_dot(rotations)
    target = reachable_key_targets(W9, K10, r10, _chol(C0), W0 @ W0.T)
    w = (lam / N0) ** 0.5
    X = torch.cat([w * K0, mu ** 0.5 * K_all, K10], 1)
    Y = torch.cat([w * (Q_tot.T @ K0), mu ** 0.5 * K_all, target], 1)
    torch.testing.assert_close(Q, _scipy_rotation(X, Y), atol=1e-5, rtol=0)
    # undo the last (compressing) commit: the 24-column memory it replaced comes back exactly
    W.copy_(W9)
    rule.undo(0, records[-1][0])
    assert torch.equal(rule.state_dict()["K.0"], records[-1][1]["K.0"])


def test_auto_solve_is_exact_where_the_krylov_basis_would_span_the_space():
    from mose_fast.rules.rotation import resolve_polar_method
    assert resolve_polar_method("auto", 768, 1) == "svd"          # small d: always exact
    assert resolve_polar_method("auto", 1536, 10) == "krylov"     # 2·10·33 = 660 < 1536
    assert resolve_polar_method("auto", 1536, 24) == "svd"        # 2·24·33 = 1584 ≥ 1536
    assert resolve_polar_method("auto", 1536, 23) == "krylov"     # 1518
    assert resolve_polar_method("auto", 1536, 100) == "svd"
    assert resolve_polar_method("auto", 13824, 100) == "krylov"   # 6600 < 13824
    assert resolve_polar_method("svd", 13824, 1) == "svd"         # an explicit method is kept
