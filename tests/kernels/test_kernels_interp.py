"""Triton kernels under TRITON_INTERPRET=1 (CPU) against float64 references, on odd shapes.

In the interpreter a bf16 tl.dot returns garbage (triton 3.9), so the crosscov kernel (whose dot
takes its operands' dtype) is checked here in fp32 and fp16, and in bf16 on a GPU
(tests/kernels/test_kernels_gpu.py).  The orth_matmul kernel widens W to fp32 before its dot, so
bf16 W runs here too."""
import os

import pytest
import torch

import mose_fast.kernels.orth_matmul as om
from mose_fast.kernels.crosscov import crosscov, crosscov_reference, crosscov_torch, crosscov_triton
from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_panels_, orth_matmul_reference, orth_matmul_triton_

triton = pytest.importorskip("triton")
pytestmark = [pytest.mark.interp,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 or CUDA")]

# (dtype, tolerance relative to the reference's largest entry)
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


def random_orthogonal(n, seed):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("m, n, k", [(67, 129, 3), (129, 67, 1), (257, 100, 40)])
@pytest.mark.parametrize("with_p", [True, False])
def test_crosscov_matches_float64(dtype, tol, m, n, k, with_p, nan_poison):
    g = torch.Generator().manual_seed(m * n + k)
    B = torch.randn(m, k, generator=g).to(dtype)
    A = torch.randn(n, k, generator=g).to(dtype)
    P = torch.randn(m, n, generator=g) if with_p else None
    M = crosscov_triton(B, A, P, alpha=0.7, beta=100.0)
    assert M.dtype == torch.float32 and not torch.isnan(M).any()
    ref = crosscov_reference(B, A, P, alpha=0.7, beta=100.0)   # from the same (rounded) operands
    assert rel_err(M, ref) <= tol


def test_crosscov_dispatch_and_errors():
    B, A = torch.randn(5, 2), torch.randn(6, 2)
    os.environ["MOSE_BACKEND_CROSSCOV"] = "triton"
    try:
        torch.testing.assert_close(crosscov(B, A), B @ A.T)
    finally:
        del os.environ["MOSE_BACKEND_CROSSCOV"]
    with pytest.raises(ValueError, match="share k"):
        crosscov_triton(B, torch.randn(6, 3))
    with pytest.raises(ValueError, match="P must be"):
        crosscov_triton(B, A, torch.randn(6, 5))


# W's dtype and the tolerance relative to the largest entry: W's own rounding (R is fp32 here)
W_DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]


@pytest.mark.parametrize("dtype, tol", W_DTYPES)
@pytest.mark.parametrize("d_out, d_in", [(67, 129), (129, 67), (257, 1000)])
def test_orth_matmul_in_place_matches_float64(dtype, tol, d_out, d_in, nan_poison):
    R = random_orthogonal(d_out, d_in)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = orth_matmul_reference(R, W)               # the exact product with the float64 R
    ptr = W.data_ptr()
    out = orth_matmul_triton_(W, R)
    assert out is W and W.data_ptr() == ptr        # in place
    assert not torch.isnan(W).any()
    assert rel_err(W, ref) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_orth_matmul_rounds_once_from_an_fp32_product(dtype, precision, nan_poison):
    """Half-precision W: the result is the exact product rounded once to W's dtype, except where
    the float32 product lands on the other side of a rounding boundary (one ulp, a handful of
    entries).  Rounding R to W's dtype first changes most entries."""
    R = random_orthogonal(67, 7)
    W = torch.randn(67, 129, generator=torch.Generator().manual_seed(8)).to(dtype)
    exact = orth_matmul_reference(R, W)
    rounded = exact.to(dtype)
    ulp = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"), dtype=dtype)) - rounded.abs()).double()
    got = orth_matmul_triton_(W.clone(), R, precision=precision)
    off = got != rounded
    assert int(off.sum()) <= 20, int(off.sum())
    assert bool(((got.double() - rounded.double()).abs() <= ulp).all())
    stale = orth_matmul_triton_(W.clone(), R.to(dtype), precision=precision)   # R rounded by the caller
    assert int((stale != rounded).sum()) > 1000


def test_orth_matmul_launcher_passes_float32_R(monkeypatch):
    """The kernel receives R in float32 whatever R's and W's dtypes, and a float32 workspace."""
    seen = []
    real = om._orth_matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(R, W, ws, *args, **kwargs):
                seen.append((R.dtype, W.dtype, ws.dtype))
                return real[grid](R, W, ws, *args, **kwargs)
            return launch
    monkeypatch.setattr(om, "_orth_matmul_kernel", Spy())
    for w_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for r_dtype in (torch.float64, torch.float32):
            seen.clear()
            W = torch.randn(16, 40).to(w_dtype)
            orth_matmul_triton_(W, random_orthogonal(16, 0).to(r_dtype))
            assert seen and all(s == (torch.float32, w_dtype, torch.float32) for s in seen), seen


def test_float64_goes_to_torch():
    """Float64 operands to the Triton entry points return exactly what the torch path returns."""
    g = torch.Generator().manual_seed(11)
    R = random_orthogonal(37, 5)
    W = torch.randn(37, 71, generator=g, dtype=torch.float64)
    expected = orth_matmul_panels_(W.clone(), R)
    assert torch.equal(orth_matmul_triton_(W.clone(), R), expected)
    assert torch.equal(orth_matmul_(W.clone(), R, backend="triton"), expected)
    assert float((expected - R @ W).abs().max()) <= 1e-13
    B = torch.randn(37, 5, generator=g, dtype=torch.float64)
    A = torch.randn(23, 5, generator=g, dtype=torch.float64)
    P = torch.randn(37, 23, generator=g, dtype=torch.float64)
    expected = crosscov_torch(B, A, P, 0.7, 100.0)
    assert expected.dtype == torch.float64
    assert torch.equal(crosscov_triton(B, A, P, 0.7, 100.0), expected)
    assert torch.equal(crosscov(B, A, P, 0.7, 100.0, backend="triton"), expected)
    torch.testing.assert_close(expected, crosscov_reference(B, A, P, 0.7, 100.0), rtol=1e-13, atol=1e-10)


def test_orth_matmul_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        orth_matmul_triton_(torch.randn(4, 4), torch.eye(4), precision="tf32")


def test_orth_matmul_on_transposed_view():
    """GPT-2 Conv1D stores Wᵀ: the kernel must write through a transposed view."""
    R = random_orthogonal(48, 3)
    storage = torch.randn(80, 48)                   # (d_in × d_out)
    ref = orth_matmul_reference(R, storage.T)
    orth_matmul_triton_(storage.T, R)
    assert rel_err(storage.T, ref) <= 1e-5


def test_orth_matmul_dispatch():
    R = random_orthogonal(16, 0)
    W = torch.randn(16, 40)
    ref = orth_matmul_reference(R, W)
    os.environ["MOSE_BACKEND_ORTH_MATMUL"] = "triton"
    try:
        orth_matmul_(W, R)
    finally:
        del os.environ["MOSE_BACKEND_ORTH_MATMUL"]
    assert rel_err(W, ref) <= 1e-5
