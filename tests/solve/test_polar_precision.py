"""Precision of the solve: the cuSOLVER drivers' conventions, and TF32 kept out of the products
that decide orthogonality even when the user switched it on globally."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from mose_fast.backends import fp32_precision_state, set_fp32_precision_state
from mose_fast.kernels.crosscov import crosscov_torch
from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_factored_
from mose_fast.solve.polar import CUSOLVER_DRIVERS, polar_from_cusolver
from mose_fast.solve.procrustes import orthogonality_error, solve_rotation, solve_subspace

# --- cuSOLVER conventions through a stand-in CuPy ---------------------------------------------------

@pytest.fixture
def stand_in_cupy(monkeypatch):
    """numpy-backed ``cupy`` / ``cupyx.cusolver`` with CuPy's return conventions:
    cupy.linalg.svd → (u, s, vh) with a = u·diag(s)·vh; cupyx.cusolver.gesvdj → (u, s, v) with
    a = u·diag(s)·vᴴ (the matrix of right singular vectors itself)."""
    calls = []

    def svd(a, full_matrices=True, compute_uv=True):
        calls.append("gesvd")
        return np.linalg.svd(a, full_matrices=full_matrices)

    def gesvdj(a, full_matrices=True, compute_uv=True, overwrite_a=False):
        calls.append("gesvdj")
        u, s, vh = np.linalg.svd(a, full_matrices=full_matrices)
        return u, s, vh.conj().T

    cupy = types.ModuleType("cupy")
    cupy.linalg = types.SimpleNamespace(svd=svd)
    cupy.from_dlpack = np.from_dlpack
    cupyx = types.ModuleType("cupyx")
    cusolver = types.ModuleType("cupyx.cusolver")
    cusolver.gesvdj = gesvdj
    cupyx.cusolver = cusolver
    for name, module in (("cupy", cupy), ("cupyx", cupyx), ("cupyx.cusolver", cusolver)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("driver", sorted(CUSOLVER_DRIVERS))
def test_cusolver_polar_factor_matches_float64_svd(driver, stand_in_cupy):
    M = torch.randn(67, 67, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = M + 0.5 * M.T @ M / 67                     # non-symmetric, well conditioned
    U, _, Vh = torch.linalg.svd(M)
    R = torch.from_numpy(np.asarray(polar_from_cusolver(M.numpy(), driver)))
    assert stand_in_cupy == [driver]
    assert float((R - U @ Vh).abs().max()) <= 1e-10
    assert orthogonality_error(R) <= 1e-10


def test_unknown_cusolver_driver_raises():
    with pytest.raises(ValueError, match="gesvda"):
        polar_from_cusolver(np.eye(3), "gesvda")


# --- TF32 switched on globally -------------------------------------------------------------------------

def tf32_on(how: str) -> None:
    if how == "legacy allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif how == "matmul precision high":
        torch.set_float32_matmul_precision("high")
    else:
        torch.backends.fp32_precision = "tf32"


TF32_SETTINGS = ["legacy allow_tf32", "matmul precision high", "new api fp32_precision"]


@pytest.fixture(params=TF32_SETTINGS)
def global_tf32(request):
    saved = fp32_precision_state()
    tf32_on(request.param)
    yield request.param
    set_fp32_precision_state(saved)


def precision_now() -> tuple:
    """The float32 precision cuBLAS and oneDNN would use now, as torch resolves it."""
    def resolved(backend):
        for op in ("matmul", "all"):
            value = torch._C._get_fp32_precision_getter(backend, op)
            if value != "none":
                return value
        return torch._C._get_fp32_precision_getter("generic", "all")
    return resolved("cuda"), resolved("mkldnn")


class PrecisionSpy(TorchFunctionMode):
    """Records the resolved precision at every matrix product."""
    PRODUCTS = {"matmul", "mm", "addmm", "addmm_", "__matmul__", "__rmatmul__", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.PRODUCTS:
            self.seen.append(precision_now())
        return func(*args, **(kwargs or {}))


def problem(d=48, n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    A = torch.randn(d, n, generator=g, dtype=torch.float64)
    V = A + 0.5 * torch.randn(d, n, generator=g, dtype=torch.float64)
    return (X @ X.T / (3 * d)).to(dtype), A.to(dtype), V.to(dtype)


def run_spied(fn):
    user = precision_now()
    assert user[0] == "tf32"                       # the user's global setting is in force
    with PrecisionSpy() as spy:
        out = fn()
    assert spy.seen, "no matrix product was observed"
    assert all(s == ("ieee", "ieee") for s in spy.seen), set(spy.seen)
    assert precision_now() == user                 # and is in force again afterwards
    return out


@pytest.mark.parametrize("method", ["svd", "newton_schulz_fp32", "polar_express_fp32"])
def test_solve_rotation_runs_at_full_precision_under_global_tf32(method, global_tf32):
    P, A, V = problem()
    res = run_spied(lambda: solve_rotation(P, A, V, 10.0, method=method, dtype=torch.float32))
    assert res.R.dtype == torch.float32
    assert orthogonality_error(res.R) <= 1e-5 and res.orth_error <= 1e-5


def test_solve_subspace_runs_at_full_precision_under_global_tf32(global_tf32):
    P, A, V = problem()
    sub = run_spied(lambda: solve_subspace(P, A, V, 10.0, dtype=torch.float32, krylov_depth=4))
    assert orthogonality_error(sub.full()) <= 1e-5


def test_apply_and_crosscov_run_at_full_precision_under_global_tf32(global_tf32):
    P, A, V = problem()
    R = solve_rotation(P, A, V, 10.0, dtype=torch.float64).R
    sub = solve_subspace(P, A, V, 10.0, dtype=torch.float64)
    W = torch.randn(48, 101)
    norm = float(W.double().norm())
    run_spied(lambda: orth_matmul_(W, R, backend="torch"))
    run_spied(lambda: orth_matmul_factored_(W, sub.Q, sub.Rk))
    assert abs(float(W.double().norm()) / norm - 1) <= 1e-5
    run_spied(lambda: crosscov_torch(V, A, P, 1.0, 10.0))
