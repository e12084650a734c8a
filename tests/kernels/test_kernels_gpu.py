"""On a CUDA device: bf16/fp16/fp32 kernels against float64, csrc, peak extra memory, and the
precision guarantees (R never rounded to W's dtype, no TF32, float64 to torch)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# W's own rounding relative to the largest entry (R float64/float32, products float32)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# crosscov's operands are rounded to their dtype by design: tolerance of the mixed-precision GEMM
CROSSCOV_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


def random_orthogonal(d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, device="cuda", dtype=torch.float64, generator=g))
    return q * torch.sign(torch.diagonal(r))


def need_csrc():
    """Skip (with the reason) where csrc cannot be built here: no nvcc, an nvcc of another CUDA major
    version than torch's, no ninja, or turned off (MOSE_CSRC=0, as gpu_check does after a failed
    build step).  A toolchain that should build it and did not is a failure."""
    from mose_fast import cuda_ext
    ok, why = cuda_ext.csrc_status()
    if not ok:
        pytest.skip(f"csrc not buildable here: {why}")
    assert cuda_ext.load() is not None, f"csrc failed to build: {cuda_ext.unavailable_reason()}"


def apply(backend, W, R):
    from mose_fast.cuda_ext import orth_matmul_cuda_
    from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_triton_
    if backend.startswith("cuda"):
        need_csrc()
    if backend == "cuda tiled":
        orth_matmul_cuda_(W, R, 0.12, gemm="tiled")
    elif backend == "cuda":
        orth_matmul_cuda_(W, R, 0.12)
    elif backend == "triton tf32x3":
        orth_matmul_triton_(W, R, precision="tf32x3")
    else:
        orth_matmul_(W, R, backend=backend)
    return W


BACKENDS = ["torch", "triton", "triton tf32x3", "cuda", "cuda tiled"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_out, d_in", [(67, 129), (257, 1000), (1024, 4099)])
def test_orth_matmul_gpu(dtype, backend, d_out, d_in):
    from mose_fast.kernels.orth_matmul import orth_matmul_reference
    R = random_orthogonal(d_out)
    W = torch.randn(d_out, d_in, device="cuda").to(dtype)
    exact = orth_matmul_reference(R, W)
    apply(backend, W, R)
    torch.cuda.synchronize()
    assert rel_err(W, exact) <= TOL[dtype]
    if dtype != torch.float32:
        # rounded once from a float32 product: only entries within float32 error of a rounding
        # boundary differ from the correctly rounded exact product (measured on the CPU: 0.2 % for
        # fp16, 0.03 % for bf16); an R rounded to W's dtype changes a third to a half of them
        assert float((W != exact.to(dtype)).float().mean()) <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tf32_under_global_tf32(backend):
    """TF32 switched on globally: float32 products still run at full precision (TF32 would leave
    errors near 1e-3)."""
    from mose_fast.backends import fp32_precision_state, set_fp32_precision_state
    from mose_fast.kernels.orth_matmul import orth_matmul_reference
    saved = fp32_precision_state()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        R = random_orthogonal(1024, 1)
        W = torch.randn(1024, 2048, device="cuda")
        exact = orth_matmul_reference(R, W)
        apply(backend, W, R)
        torch.cuda.synchronize()
        assert rel_err(W, exact) <= 1e-5
    finally:
        set_fp32_precision_state(saved)


@pytest.mark.parametrize("d", [48, 512])
def test_float32_solve_orthogonal_under_global_tf32(d):
    from mose_fast.backends import fp32_precision_state, set_fp32_precision_state
    from mose_fast.solve.procrustes import orthogonality_error, solve_rotation
    saved = fp32_precision_state()
    torch.set_float32_matmul_precision("high")
    try:
        g = torch.Generator(device="cuda").manual_seed(d)
        X = torch.randn(d, 2 * d, device="cuda", generator=g)
        A = torch.randn(d, 2, device="cuda", generator=g)
        res = solve_rotation(X @ X.T / (2 * d), A, A + 0.3 * torch.randn_like(A), 10.0, dtype=torch.float32)
        # float32 products: ‖RᵀR − I‖_F ≈ 1.5e-6 at d = 512 (measured on the CPU); TF32 ≈ 1e-3 per entry
        assert orthogonality_error(res.R) <= 1e-5
    finally:
        set_fp32_precision_state(saved)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_thousand_bf16_rotations_gpu(backend):
    """The CPU test's harness (tests/kernels/test_bf16_sequential.py) on the GPU paths."""
    from test_bf16_sequential import check, run

    from mose_fast.kernels.orth_matmul import orth_matmul_
    if backend == "cuda":
        need_csrc()
    check(run(lambda W, Q, Rk, R: orth_matmul_(W, R, backend=backend), shape=(256, 1024), device="cuda"))


def test_float64_goes_to_torch_gpu():
    from mose_fast.kernels.crosscov import crosscov_torch, crosscov_triton
    from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_panels_
    R = random_orthogonal(129, 2)
    W = torch.randn(129, 257, device="cuda", dtype=torch.float64)
    expected = orth_matmul_panels_(W.clone(), R)
    for backend in ("triton", "cuda"):
        assert torch.equal(orth_matmul_(W.clone(), R, backend=backend), expected)
    B = torch.randn(129, 5, device="cuda", dtype=torch.float64)
    A = torch.randn(67, 5, device="cuda", dtype=torch.float64)
    P = torch.randn(129, 67, device="cuda", dtype=torch.float64)
    assert torch.equal(crosscov_triton(B, A, P, 0.5, 10.0), crosscov_torch(B, A, P, 0.5, 10.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_crosscov_gpu(dtype):
    from mose_fast.kernels.crosscov import crosscov_reference, crosscov_triton
    B, A = torch.randn(257, 33, device="cuda").to(dtype), torch.randn(129, 33, device="cuda").to(dtype)
    P = torch.randn(257, 129, device="cuda")
    M = crosscov_triton(B, A, P, 0.5, 100.0)
    assert M.dtype == torch.float32
    assert rel_err(M, crosscov_reference(B, A, P, 0.5, 100.0)) <= CROSSCOV_TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_inplace_peak_memory_gpu(backend):
    from mose_fast.kernels.orth_matmul import orth_matmul_
    d, n = 4096, 14336
    W = torch.randn(d, n, device="cuda", dtype=torch.bfloat16)
    R = random_orthogonal(d).float()       # in float32 already: no d × d cast copy inside the call
    if backend == "cuda":
        need_csrc()
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
    from mose_fast.backends import cupy_status
    usable, why = cupy_status()
    if not usable:
        pytest.skip(f"cupy not usable here: {why}")
    from mose_fast.solve.polar import polar_cupy, polar_svd
    from mose_fast.solve.procrustes import orthogonality_error
    X = torch.randn(512, 1024, device="cuda", dtype=torch.float64)
    M = X @ X.T / 1024 + 0.1 * torch.randn(512, 512, device="cuda", dtype=torch.float64)   # non-symmetric
    R = polar_cupy(M, driver)
    assert orthogonality_error(R) <= 1e-10
    assert float(torch.linalg.matrix_norm(R - polar_svd(M))) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gemm", ["cublas", "tiled"])
@pytest.mark.parametrize("transposed", [False, True])
def test_csrc_panels_both_gemms(dtype, gemm, transposed):
    """csrc's panel loop with cuBLAS and with its own tiled kernel, on a row-major W and on a
    transposed view (GPT-2 Conv1D), against float64; odd sizes so the last panel is narrower."""
    from mose_fast.cuda_ext import orth_matmul_cuda_
    from mose_fast.kernels.orth_matmul import orth_matmul_reference
    d_out, d_in = 257, 1003
    R = random_orthogonal(d_out, 3)
    store = torch.randn(d_in, d_out, device="cuda").to(dtype) if transposed else \
        torch.randn(d_out, d_in, device="cuda").to(dtype)
    W = store.T if transposed else store
    exact = orth_matmul_reference(R, W)
    need_csrc()
    orth_matmul_cuda_(W, R, 0.12, gemm=gemm)
    torch.cuda.synchronize()
    assert rel_err(W, exact) <= TOL[dtype]
