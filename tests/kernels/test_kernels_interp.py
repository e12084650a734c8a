"""Triton kernels under TRITON_INTERPRET=1 (CPU) against float64 references, on odd shapes.

fp32 and fp16 only: in the interpreter a bf16 tl.dot returns garbage (triton 3.9), so bf16 is
checked on a GPU (tests/kernels/test_kernels_gpu.py)."""
import os

import pytest
import torch

from mose_fast.kernels.crosscov import crosscov, crosscov_reference, crosscov_triton
from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_reference, orth_matmul_triton_

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


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("d_out, d_in", [(67, 129), (129, 67), (257, 1000)])
def test_orth_matmul_in_place_matches_float64(dtype, tol, d_out, d_in, nan_poison):
    R = random_orthogonal(d_out, d_in)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = orth_matmul_reference(R.to(dtype), W)     # R as the kernel sees it, product in float64
    ptr = W.data_ptr()
    out = orth_matmul_triton_(W, R)
    assert out is W and W.data_ptr() == ptr        # in place
    assert not torch.isnan(W).any()
    assert rel_err(W, ref) <= tol


def test_orth_matmul_on_transposed_view():
    """GPT-2 Conv1D stores Wᵀ: the kernel must write through a transposed view."""
    R = random_orthogonal(48, 3)
    storage = torch.randn(80, 48)                   # (d_in × d_out)
    ref = orth_matmul_reference(R.float(), storage.T)
    orth_matmul_triton_(storage.T, R)
    assert rel_err(storage.T, ref) <= 1e-5


def test_orth_matmul_dispatch():
    R = random_orthogonal(16, 0)
    W = torch.randn(16, 40)
    ref = orth_matmul_reference(R.float(), W)
    os.environ["MOSE_BACKEND_ORTH_MATMUL"] = "triton"
    try:
        orth_matmul_(W, R)
    finally:
        del os.environ["MOSE_BACKEND_ORTH_MATMUL"]
    assert rel_err(W, ref) <= 1e-5
