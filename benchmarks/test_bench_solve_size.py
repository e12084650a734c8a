"""Where the exact solve stops paying: the MOSE solve (retention operator + an edit of n = 10 keys)
by the dense SVD and by the block-Krylov subspace solve, at growing widths d — on the device the
benchmarks run on.  ``rules.rotation.EXACT_SOLVE_MAX_DIM`` (the "auto" method's switch) is set from
these rows.  The note gives the Krylov solve's objective relative to the exact one's.

    python -m pytest benchmarks/test_bench_solve_size.py -m bench
"""
import pytest
import torch

pytestmark = pytest.mark.bench
DIMS = (512, 768, 1024, 1536, 2048, 3072)


def problem(d: int, n: int = 10, seed: int = 0, device="cpu"):
    """A retention Gram with a corpus-like decaying spectrum, n edit keys and their targets."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    evals = torch.logspace(0, -6, d, dtype=torch.float64)
    G = (U * evals) @ U.T
    K = U[:, :64] @ torch.randn(64, n, generator=g, dtype=torch.float64)
    V = K + 0.3 * torch.randn(d, n, generator=g, dtype=torch.float64) * K.norm(dim=0) / d ** 0.5
    return G.to(device), K.to(device), V.to(device)


@pytest.mark.parametrize("method", ["svd", "krylov"])
@pytest.mark.parametrize("d", DIMS)
def test_solve_by_width(benchmark, record, device, d, method):
    from mose_fast.rules.rotation import RetentionOperator, solve_polar
    G, K, V = problem(d, device=device)
    P = RetentionOperator(G, 10.0)
    const = P.trace()
    result = {}

    def solve():
        result["r"] = solve_polar(P, K, V, method, torch.float64, const)[0]
    benchmark.pedantic(solve, rounds=3, warmup_rounds=1)
    exact = solve_polar(P, K, V, "svd", torch.float64, const)[0]
    gap = (result["r"].objective - exact.objective) / max(abs(exact.objective_identity - exact.objective), 1e-300)
    record(benchmark, "mose_solve", method, f"d={d}, n=10", "float64",
           note=f"objective excess over exact: {gap:.2e} of the exact solve's gain")
