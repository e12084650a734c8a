"""On a CUDA device: bf16/fp16/fp32 kernels against float64, csrc, and peak extra memory."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("d_out, d_in", [(67, 129), (257, 1000), (1024, 4099)])
def test_orth_matmul_gpu(dtype, backend, d_out, d_in):
    from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_reference
    R = torch.linalg.qr(torch.randn(d_out, d_out, device="cuda", dtype=torch.float64))[0]
    W = torch.randn(d_out, d_in, device="cuda").to(dtype)
    ref = orth_matmul_reference(R.to(dtype), W)
    orth_matmul_(W, R, backend=backend)
    assert rel_err(W, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_crosscov_gpu(dtype):
    from mose_fast.kernels.crosscov import crosscov_reference, crosscov_triton
    B, A = torch.randn(257, 33, device="cuda").to(dtype), torch.randn(129, 33, device="cuda").to(dtype)
    P = torch.randn(257, 129, device="cuda")
    assert rel_err(crosscov_triton(B, A, P, 0.5, 100.0), crosscov_reference(B, A, P, 0.5, 100.0)) <= TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_inplace_peak_memory_gpu(backend):
    from mose_fast.kernels.orth_matmul import orth_matmul_
    d, n = 4096, 14336
    W = torch.randn(d, n, device="cuda", dtype=torch.bfloat16)
    R = torch.linalg.qr(torch.randn(d, d, device="cuda"))[0].to(torch.bfloat16)
    orth_matmul_(W[:, :256].clone(), R, backend=backend)          # build/compile outside the window
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    orth_matmul_(W, R, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= W.numel() * W.element_size() / 8, extra


@pytest.mark.parametrize("driver", ["gesvd", "gesvdj"])
def test_cupy_polar_matches_torch(driver):
    pytest.importorskip("cupy")
    from mose_fast.solve.polar import polar_cupy, polar_svd
    from mose_fast.solve.procrustes import orthogonality_error
    X = torch.randn(512, 1024, device="cuda", dtype=torch.float64)
    M = X @ X.T / 1024 + 0.1 * torch.randn(512, 512, device="cuda", dtype=torch.float64)
    R = polar_cupy(M, driver)
    assert orthogonality_error(R) <= 1e-10
    assert float(torch.linalg.matrix_norm(R - polar_svd(M))) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemm", ["cublas", "tiled"])
@pytest.mark.parametrize("transposed", [False, True])
def test_csrc_panels_both_gemms(dtype, gemm, transposed):
    """csrc's panel loop with cuBLAS and with its own tiled kernel, on a row-major W and on a
    transposed view (GPT-2 Conv1D), against float64; odd sizes so the last panel is narrower."""
    from mose_fast.cuda_ext import orth_matmul_cuda_
    from mose_fast.kernels.orth_matmul import orth_matmul_reference
    d_out, d_in = 257, 1003
    R = torch.linalg.qr(torch.randn(d_out, d_out, device="cuda", dtype=torch.float64))[0]
    store = torch.randn(d_in, d_out, device="cuda").to(dtype) if transposed else \
        torch.randn(d_out, d_in, device="cuda").to(dtype)
    W = store.T if transposed else store
    ref = orth_matmul_reference(R.to(dtype), W)
    out = orth_matmul_cuda_(W, R, 0.12, gemm=gemm)
    assert out is not None, "csrc failed to build on a CUDA machine"
    torch.cuda.synchronize()
    assert rel_err(W, ref) <= TOL[dtype]
