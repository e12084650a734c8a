"""The closed-form solve against float64 references and against perturbed competitors."""
import numpy as np
import pytest
import scipy.linalg
import torch

from mose_fast.kernels.orth_matmul import orth_matmul_panels_
from mose_fast.solve.polar import POLAR_METHODS
from mose_fast.solve.procrustes import objective, orthogonality_error, solve_rotation


def problem(d_out=24, d_in=40, n0=600, n_edit=3, lam=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    K0 = torch.randn(d_in, n0, generator=g, dtype=torch.float64)
    KE = torch.randn(d_in, n_edit, generator=g, dtype=torch.float64)
    C0 = K0 @ K0.T / n0
    A = W @ KE
    V = A + 0.8 * torch.randn(d_out, n_edit, generator=g, dtype=torch.float64) * A.norm(dim=0)
    return dict(W=W, K0=K0, KE=KE, C0=C0, P=W @ C0 @ W.T, A=A, V=V, lam=lam, n0=n0)


def direct_objective(R, pb):
    """The objective as written in the paper, from the raw keys (no Gram shortcut)."""
    W, K0 = pb["W"], pb["K0"]
    retention = (R @ W @ K0 - W @ K0).pow(2).sum() / pb["n0"]
    return float(pb["lam"] * retention + (R @ pb["A"] - pb["V"]).pow(2).sum())


def random_orthogonal_near(R, scale, g):
    S = torch.randn(R.shape, generator=g, dtype=torch.float64)
    return R @ torch.linalg.matrix_exp(scale * (S - S.T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_is_the_procrustes_optimum(seed):
    pb = problem(seed=seed)
    res = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"])
    R = res.R
    # the reported objective is the paper's objective, computed independently from K0
    assert res.objective == pytest.approx(direct_objective(R, pb), rel=1e-10)
    eye = torch.eye(R.shape[0], dtype=torch.float64)
    assert res.objective <= direct_objective(eye, pb)
    assert res.objective < res.objective_identity
    g = torch.Generator().manual_seed(100 + seed)
    competitors = [direct_objective(random_orthogonal_near(R, s, g), pb)
                   for s in np.repeat([1e-3, 1e-2, 1e-1], 334)[:1000]]
    assert min(competitors) >= res.objective - 1e-9 * abs(res.objective)


def test_matches_scipy_orthogonal_procrustes():
    """Stack retention and edit columns into one Procrustes problem and solve it with SciPy."""
    pb = problem(seed=3)
    w = np.sqrt(pb["lam"] / pb["n0"])
    X = torch.cat([w * pb["W"] @ pb["K0"], pb["A"]], 1).numpy()   # R·X ≈ Y
    Y = torch.cat([w * pb["W"] @ pb["K0"], pb["V"]], 1).numpy()
    Rt, _ = scipy.linalg.orthogonal_procrustes(X.T, Y.T)          # min ‖Xᵀ·Q − Yᵀ‖, Q = Rᵀ
    res = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"])
    np.testing.assert_allclose(res.R.numpy(), Rt.T, atol=1e-10)


@pytest.mark.parametrize("method", sorted(POLAR_METHODS))
def test_polar_methods_orthogonal_and_optimal(method):
    if method.startswith("cupy"):
        pytest.skip("cuSOLVER methods need a CUDA tensor (tests/kernels/test_kernels_gpu.py)")
    pb = problem(seed=4, lam=50.0)   # λ·P dominant: M well conditioned, every method applies
    ref = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"], method="svd")
    res = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"], method=method)
    assert res.orth_error <= 1e-10
    assert orthogonality_error(res.R) <= 1e-10
    assert res.objective == pytest.approx(ref.objective, rel=1e-8)
    # float32 iterations reach the polar factor to float32 accuracy; the float64 finish restores
    # orthogonality, not the lost digits
    torch.testing.assert_close(res.R, ref.R, atol=1e-5 if method.endswith("fp32") else 1e-7, rtol=0)


def test_lambda_zero_fits_edit_exactly_when_norms_match():
    """With λ = 0 and a target of the same norm, a rotation reaches the target exactly."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(16, 1, generator=g, dtype=torch.float64)
    V = torch.randn(16, 1, generator=g, dtype=torch.float64)
    V = V * A.norm() / V.norm()
    P = torch.eye(16, dtype=torch.float64)
    res = solve_rotation(P, A, V, lam=0.0)
    torch.testing.assert_close(res.R @ A, V, atol=1e-12, rtol=0)


def test_bad_inputs_raise():
    pb = problem()
    bad = pb["V"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in V_E"):
        solve_rotation(pb["P"], pb["A"], bad, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        solve_rotation(pb["P"], pb["A"], pb["V"][:, :2], 1.0)
    with pytest.raises(ValueError, match="unknown polar method"):
        solve_rotation(pb["P"], pb["A"], pb["V"], 1.0, method="magic")


def test_objective_helper_matches_direct():
    pb = problem(seed=6)
    g = torch.Generator().manual_seed(7)
    Q = random_orthogonal_near(torch.eye(24, dtype=torch.float64), 0.3, g)
    assert objective(Q, pb["P"], pb["A"], pb["V"], pb["lam"]) == pytest.approx(direct_objective(Q, pb), rel=1e-10)


def test_thousand_sequential_rotations_preserve_norm_and_spectrum():
    """1000 rotations applied in place to a float32 matrix, as the editor does on the CPU
    (R float64, product in float64, rounded once to float32 per edit)."""
    g = torch.Generator().manual_seed(8)
    W = torch.randn(48, 96, generator=g)
    s0 = torch.linalg.svdvals(W.double())
    n0 = torch.linalg.matrix_norm(W.double())
    for _ in range(1000):
        S = 0.05 * torch.randn(48, 48, generator=g, dtype=torch.float64)
        R = torch.linalg.matrix_exp(S - S.T)
        orth_matmul_panels_(W, R, compute_dtype=torch.float64)
    s1 = torch.linalg.svdvals(W.double())
    assert abs(float(torch.linalg.matrix_norm(W.double()) / n0) - 1) <= 1e-5
    assert float(((s1 - s0).abs() / s0).max()) <= 1e-5


def test_subspace_solve_is_optimal_within_its_family_and_close_to_exact():
    from mose_fast.solve.procrustes import solve_subspace
    pb = problem(seed=9, lam=5.0)
    sub = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"])
    R = sub.full()
    assert orthogonality_error(R) <= 1e-10
    # the reported objective is the paper's objective at the full R
    assert sub.objective == pytest.approx(direct_objective(R, pb), rel=1e-10)
    exact = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"])
    assert exact.objective <= sub.objective + 1e-9 * abs(sub.objective)
    assert sub.objective < sub.objective_identity
    # optimal among rotations acting on span(Q): perturb Rk by random k × k rotations
    g = torch.Generator().manual_seed(10)
    eye = torch.eye(R.shape[0], dtype=torch.float64)
    k = sub.Q.shape[1]
    for _ in range(200):
        Rk = random_orthogonal_near(sub.Rk, 0.05, g)
        Rp = eye + sub.Q @ (Rk - torch.eye(k, dtype=torch.float64)) @ sub.Q.T
        assert direct_objective(Rp, pb) >= sub.objective - 1e-9 * abs(sub.objective)


def test_factored_apply_matches_full_rotation():
    from mose_fast.kernels.orth_matmul import orth_matmul_factored_
    from mose_fast.solve.procrustes import solve_subspace
    pb = problem(seed=11)
    sub = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"])
    for dtype, compute, tol in ((torch.float64, None, 1e-12), (torch.float32, torch.float64, 1e-6),
                                (torch.float32, None, 1e-5)):
        W = pb["W"].to(dtype).clone()
        ref = sub.full() @ W.double()
        orth_matmul_factored_(W, sub.Q, sub.Rk, compute_dtype=compute)
        assert float((W.double() - ref).abs().max() / ref.abs().max()) <= tol


def test_cupy_methods_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA tensor"):
        POLAR_METHODS["cupy_gesvdj"](torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("lo", [1e-6, 1e-3, 0.1, 0.5, 0.95])
def test_optimal_cubic_is_the_minimax_cubic(lo):
    """Equioscillation at lo, x* and 1 with alternating signs, and no nearby cubic has a smaller
    maximum error on [lo, 1] (checked on a dense grid against 2000 random perturbations)."""
    from mose_fast.solve.polar import optimal_cubic
    a, b, e = optimal_cubic(lo)
    p = lambda x, a=a, b=b: a * x - b * x ** 3
    xs = np.sqrt(a / (3 * b))
    np.testing.assert_allclose([1 - p(lo), p(xs) - 1, 1 - p(1.0)], [e, e, e], rtol=1e-12, atol=1e-14)
    grid = np.concatenate([np.linspace(lo, 1.0, 20001), [xs]])
    best = np.abs(1 - p(grid)).max()
    assert best == pytest.approx(e, rel=1e-9)
    rng = np.random.default_rng(0)
    for da, db in rng.normal(scale=1e-3 * (a + b), size=(2000, 2)):
        assert np.abs(1 - p(grid, a + da, b + db)).max() >= best * (1 - 1e-12)


def test_optimal_cubic_at_one_is_newton_schulz():
    from mose_fast.solve.polar import optimal_cubic
    assert optimal_cubic(1.0) == pytest.approx((1.5, 0.5, 0.0), abs=1e-15)


@pytest.mark.parametrize("decades", [2, 5, 8])
def test_polar_express_converges_on_ill_conditioned_matrices(decades):
    """Float64 Polar Express against the SVD polar factor, singular values spread over 10^decades;
    its minimax steps take no more Gram products than plain Newton–Schulz."""
    from mose_fast.solve.polar import polar_express, polar_newton_schulz, polar_svd
    g = torch.Generator().manual_seed(decades)
    d = 64
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    M = U @ torch.diag(torch.logspace(0, -decades, d, dtype=torch.float64)) @ V.T
    ref = polar_svd(M)
    X = polar_express(M, steps=200)
    assert orthogonality_error(X) <= 1e-12
    # the polar factor's sensitivity grows like 1/σ_min: allow the SVD's own conditioning
    assert float(torch.linalg.matrix_norm(X - ref)) <= 1e-13 * 10 ** decades * d
    counts = {}
    for name, fn in (("pe", polar_express), ("ns", polar_newton_schulz)):
        calls = [0]

        class Counting(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.Tensor.__matmul__:
                    calls[0] += 1
                return func(*args, **(kwargs or {}))
        with Counting():
            fn(M, steps=400)
        counts[name] = calls[0]
    assert counts["pe"] <= counts["ns"]


def test_krylov_subspace_solve_improves_monotonically_and_reaches_the_exact_solve():
    from mose_fast.solve.procrustes import solve_subspace
    pb = problem(seed=12, lam=5.0)
    exact = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"])
    objectives = []
    for depth in range(0, 12):
        sub = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"], krylov_depth=depth)
        R = sub.full()
        assert orthogonality_error(R) <= 1e-10
        assert sub.objective == pytest.approx(direct_objective(R, pb), rel=1e-10)
        objectives.append(sub.objective)
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(objectives, objectives[1:]))
    assert objectives[1] < objectives[0]
    # blocks of 6 columns: by depth 3 the basis spans all 24 dimensions
    sub = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"], krylov_depth=11)
    assert sub.Q.shape[1] == 24
    torch.testing.assert_close(sub.full(), exact.R, atol=1e-10, rtol=0)
    assert sub.objective == pytest.approx(exact.objective, rel=1e-12)


def test_randomized_range_finder_subspace():
    """Adding P's top eigenvectors (randomized range finder) can only help; the sketch is
    reproducible and leaves the caller's random stream alone; rank d gives the exact solve."""
    from mose_fast.solve.procrustes import solve_subspace
    pb = problem(seed=13, lam=5.0)
    base = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    r1 = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"], random_rank=8, seed=1)
    assert torch.equal(torch.rand(1), before)
    r2 = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"], random_rank=8, seed=1)
    torch.testing.assert_close(r1.full(), r2.full(), atol=0, rtol=0)
    assert r1.objective <= base.objective + 1e-9 * abs(base.objective)
    assert r1.objective == pytest.approx(direct_objective(r1.full(), pb), rel=1e-10)
    full = solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"], random_rank=24)
    exact = solve_rotation(pb["P"], pb["A"], pb["V"], pb["lam"])
    assert full.objective == pytest.approx(exact.objective, rel=1e-10)
    with pytest.raises(ValueError, match="krylov_depth"):
        solve_subspace(pb["P"], pb["A"], pb["V"], pb["lam"], krylov_depth=-1)


def test_subspace_solve_of_no_edit_directions_is_the_identity():
    """A_E = V_E = 0 spans nothing: every subspace method returns the identity (an empty basis) with
    the objective of no edit, also without Krylov blocks."""
    from mose_fast.solve.procrustes import solve_subspace
    pb = problem()
    zero = torch.zeros_like(pb["A"])
    for depth in (0, 4):
        sub = solve_subspace(pb["P"], zero, zero, pb["lam"], krylov_depth=depth)
        assert sub.Q.shape == (pb["P"].shape[0], 0) and sub.Rk.shape == (0, 0)
        assert sub.objective == sub.objective_identity
