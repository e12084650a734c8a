"""MOSE with the rotation on the input side (W ← W·Q, issue 4): the reachable key targets against
an independent KKT solve, the rotation against SciPy's Procrustes on the stacked problem, the
spectrum, undo and the run-folder state."""
import numpy as np
import pytest
import torch

from test_rules import D_IN, D_OUT, N0, _scipy_rotation, problem
from mose_fast.rules import MOSEInputRule, MOSERule, make_rule
from mose_fast.rules.mose_input import PREIMAGE_RIDGE, reachable_key_targets
from conftest import tiny_mose_config


def _chol(C0):
    ridge = PREIMAGE_RIDGE * float(torch.trace(C0)) / C0.shape[0]
    return torch.linalg.cholesky(C0 + ridge * torch.eye(C0.shape[0], dtype=C0.dtype))


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


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
@pytest.mark.parametrize("retain, mu", [("current", 0.0), ("original", 0.0), ("original", 2.0)])
def test_input_rotation_solves_the_stacked_procrustes_problem(retain, mu, polar_method):
    """Two sequential edits; the second rotation Q equals SciPy's on the stacked key-space problem
    [√(λ/N)·K0 | √μ·K1 | K2] → [√(λ/N)·Y0 | √μ·K1 | K2*] (Y0 = K0, or Q1ᵀ·K0 to retain the unedited
    model), W becomes W1·Q, and the singular values of W never move."""
    W0, K0, C0, K, resid = problem(32)
    resid = 0.3 * resid
    lam = 3.0
    rule = MOSEInputRule(lam, polar_method=polar_method, retain=retain, edit_memory=mu)
    W = W0.clone()
    rule.prepare(0, W, C0)
    first = rule.update(0, W, K[:, :1], resid[:, :1])
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:3], resid[:, 1:3])
    Q1 = _dense(first.undo)
    Q = _dense(res.undo)
    torch.testing.assert_close(W, W1 @ Q, atol=1e-12, rtol=0)
    K2 = K[:, 1:3]
    K2_target = reachable_key_targets(W1, K2, resid[:, 1:3], _chol(C0), W0 @ W0.T)
    w = (lam / N0) ** 0.5
    Y0 = Q1.T @ K0 if retain == "original" else K0
    X = torch.cat([w * K0, mu ** 0.5 * K[:, :1], K2], 1)
    Y = torch.cat([w * Y0, mu ** 0.5 * K[:, :1], K2_target], 1)
    torch.testing.assert_close(Q, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert res.objective == pytest.approx(float((Q @ X - Y).pow(2).sum()), rel=1e-9)
    assert res.objective < res.objective_identity == pytest.approx(float((X - Y).pow(2).sum()), rel=1e-9)
    torch.testing.assert_close(torch.linalg.svdvals(W), torch.linalg.svdvals(W0), atol=0, rtol=1e-12)


def _dense(rot):
    if rot.R is not None:
        return rot.R
    eye = torch.eye(rot.Q.shape[0], dtype=rot.Q.dtype)
    return eye + rot.Q @ (rot.Rk - torch.eye(rot.Rk.shape[0], dtype=rot.Rk.dtype)) @ rot.Q.T


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
def test_input_rotation_undo_and_snapshot(polar_method):
    W0, _, C0, K, resid = problem(34)
    rule = MOSEInputRule(3.0, polar_method=polar_method, retain="original", edit_memory=1.0)
    W = W0.clone()
    rule.prepare(0, W, C0)
    rule.update(0, W, K[:, :1], 0.3 * resid[:, :1])
    state = rule.snapshot()
    assert set(state) == {"G0", "E0"} and float(state["E0"].norm()) > 0
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:2], 0.3 * resid[:, 1:2])
    rule.revert(0, W, res.undo)
    torch.testing.assert_close(W, W1, atol=1e-12, rtol=0)
    torch.testing.assert_close(rule.cross[0], state["G0"], atol=1e-12, rtol=0)
    torch.testing.assert_close(rule.memory[0], state["E0"], atol=1e-12, rtol=0)
    # a run folder restores G and E before the first prepare(); prepare keeps them
    fresh = MOSEInputRule(3.0, polar_method=polar_method, retain="original", edit_memory=1.0)
    fresh.restore(state)
    fresh.prepare(0, W1, C0)
    assert fresh.cross[0] is state["G0"] and fresh.memory[0] is state["E0"]


def test_make_rule_picks_the_side():
    assert isinstance(make_rule(tiny_mose_config(rule_hparams={"side": "input"})), MOSEInputRule)
    assert isinstance(make_rule(tiny_mose_config(rule_hparams={"side": "output"})), MOSERule)
    with pytest.raises(ValueError, match="side='both'"):
        make_rule(tiny_mose_config(rule_hparams={"side": "both"}))
    with pytest.raises(ValueError, match="bad rule_hparams for mose side=input"):
        make_rule(tiny_mose_config(rule_hparams={"side": "input", "match_norms": True}))


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
        rule = MOSEInputRule(lam, polar_method=polar_method, retain="original", edit_memory=mu, memory_cap=cap)
        W = W0.clone()
        rule.prepare(0, W, C0)
        first = rule.update(0, W, K[:, :1], resid[:, :1])     # empty memory: no cap acts
        W1 = W.clone()
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


def _split_spectrum_problem(seed):
    """d_in = 40 keys whose second moment has 16 large eigenvalues (1–10) and 24 small ones
    (1e-4–1e-3): with null_space = 1e-2 the rotation lives in a 24-dim U, more than d_out = 12,
    so every residual is reachable inside U."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in, n0 = 12, 40, 800
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    scale = torch.cat([torch.linspace(1.0, 10.0, 16), torch.linspace(1e-4, 1e-3, 24)]).double().sqrt()
    K0 = basis @ (scale[:, None] * torch.randn(d_in, n0, generator=g, dtype=torch.float64))
    C0 = K0 @ K0.T / n0
    K = basis @ (torch.ones(d_in, dtype=torch.float64)[:, None] * torch.randn(d_in, 3, generator=g, dtype=torch.float64))
    resid = 0.3 * torch.randn(d_out, 3, generator=g, dtype=torch.float64)
    return W, K0, C0, K, resid


def _small_eigenspace(C0, threshold):
    evals, evecs = np.linalg.eigh(C0.numpy())
    small = evals < threshold * evals.max()
    return torch.from_numpy(evecs[:, small]), torch.from_numpy(evals[small])


@pytest.mark.parametrize("polar_method", ["svd", "krylov"])
@pytest.mark.parametrize("retain, mu", [("current", 0.0), ("original", 2.0)])
def test_null_space_rotation_is_the_procrustes_solution_inside_U(retain, mu, polar_method):
    """null_space = τ: the keys in C0's dominant subspace map exactly as before; the first edit
    (λ = 0) meets its output exactly; the second rotation restricted to U equals SciPy's on the
    stacked problem in U's coordinates; singular values never move."""
    W0, K0, C0, K, resid = _split_spectrum_problem(40)
    U, small_evals = _small_eigenspace(C0, 1e-2)
    assert U.shape[1] == 24
    lam = 3.0
    rule = MOSEInputRule(lam, polar_method=polar_method, retain=retain, edit_memory=mu, null_space=1e-2)
    W = W0.clone()
    rule.prepare(0, W, C0)
    lam_saved, rule.lam = rule.lam, 0.0        # first edit: nothing to keep but the subspace
    first = rule.update(0, W, K[:, :1], resid[:, :1])
    rule.lam = lam_saved
    torch.testing.assert_close(W @ K[:, :1], W0 @ K[:, :1] + resid[:, :1], atol=1e-9, rtol=0)
    W1 = W.clone()
    res = rule.update(0, W, K[:, 1:3], resid[:, 1:3])
    Q1, Q = _dense(first.undo), _dense(res.undo)
    torch.testing.assert_close(W, W1 @ Q, atol=1e-12, rtol=0)
    dominant = torch.eye(40, dtype=torch.float64) - U @ U.T
    torch.testing.assert_close(W @ dominant, W0 @ dominant, atol=1e-10, rtol=0)   # Q = I off U
    torch.testing.assert_close(torch.linalg.svdvals(W), torch.linalg.svdvals(W0), atol=0, rtol=1e-12)
    # the second edit's targets inside U: W1·U·(k*_U − k_U) = resid and ‖k*_U‖ = ‖k_U‖
    K2_U = U.T @ K[:, 1:3]
    chol = torch.diag((small_evals + PREIMAGE_RIDGE * float(torch.trace(C0)) / 40).sqrt())
    K2_U_target = reachable_key_targets(W1 @ U, K2_U, resid[:, 1:3], chol, (W0 @ U) @ (W0 @ U).T)
    torch.testing.assert_close(W1 @ U @ (K2_U_target - K2_U), resid[:, 1:3], atol=1e-9, rtol=0)
    torch.testing.assert_close(K2_U_target.norm(dim=0), K2_U.norm(dim=0), atol=0, rtol=1e-12)
    w = (lam / K0.shape[1]) ** 0.5
    Y0 = Q1.T @ K0 if retain == "original" else K0
    X = torch.cat([w * U.T @ K0, mu ** 0.5 * U.T @ K[:, :1], K2_U], 1)
    Y = torch.cat([w * U.T @ Y0, mu ** 0.5 * U.T @ K[:, :1], K2_U_target], 1)
    torch.testing.assert_close(U.T @ Q @ U, _scipy_rotation(X, Y), atol=1e-9, rtol=0)
    assert res.objective == pytest.approx(float((U.T @ Q @ U @ X - Y).pow(2).sum()), rel=1e-9)
    # undo takes W back
    rule.revert(0, W, res.undo)
    torch.testing.assert_close(W, W1, atol=1e-12, rtol=0)


def test_null_space_is_checked():
    W, _, C0, _, _ = _split_spectrum_problem(41)
    for bad in (0.0, -1e-2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="null_space"):
            MOSEInputRule(1.0, null_space=bad)
    rule = MOSEInputRule(1.0, null_space=1e-9)          # below every eigenvalue ratio: empty U
    with pytest.raises(ValueError, match="nothing to rotate in"):
        rule.prepare(0, W, C0)
    assert not rule.C0 and not rule.basis


@pytest.mark.parametrize("rho", [1.0, 100.0])
def test_preimage_ridge_moves_the_target_key_by_the_ridged_kkt_shift(rho):
    """preimage_ridge ρ: with λ = 0 one key is rotated exactly onto its target k*, which is the
    KKT shift for dᵀ·(C0 + ρ·c̄·I)·d brought back to ‖k‖ along null(W); a larger ρ moves it less."""
    W0, _, C0, K, resid = problem(35)
    k, r = K[:, :1], 0.3 * resid[:, :1]
    ridge = rho * float(torch.trace(C0)) / C0.shape[0]
    shifted = k + _kkt_shift(W0, C0 + ridge * torch.eye(C0.shape[0], dtype=C0.dtype), r)
    n = _null_projector(W0) @ shifted
    roots = np.roots([float((n * n).sum()), -2 * float((n * shifted).sum()), float((shifted * shifted).sum() - (k * k).sum())])
    want = shifted - min(roots.real, key=abs) * n
    moved = {}
    for ridge_option in (rho, 1e-8):
        rule = MOSEInputRule(0.0, preimage_ridge=ridge_option)
        W = W0.clone()
        rule.prepare(0, W, C0)
        Q = _dense(rule.update(0, W, k, r).undo)
        torch.testing.assert_close(W @ k, W0 @ k + r, atol=1e-9, rtol=0)
        moved[ridge_option] = float((Q @ k - k).norm())
        if ridge_option == rho:
            torch.testing.assert_close(Q @ k, want, atol=1e-9, rtol=0)
    assert moved[rho] < moved[1e-8]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="preimage_ridge"):
            MOSEInputRule(1.0, preimage_ridge=bad)
