"""Per-operation benchmarks: polar factor, cross-covariance, in-place orthogonal apply.

    pytest benchmarks -m bench --benchmark-only          # CPU sizes, or the paper's sizes on CUDA

On CUDA the shapes are those of 7B-13B down_proj (d_out 4096/5120/8192, d_in 11008/13824/14336)
and each figure is compared with its torch/cuBLAS counterpart; on the CPU the shapes are
SmolLM2-sized so a run stays within minutes."""
import importlib.util

import pytest
import torch

from mose_fast.kernels.crosscov import crosscov
from mose_fast.kernels.orth_matmul import orth_matmul_, orth_matmul_triton_
from mose_fast.solve.procrustes import POLAR_METHODS, SUBSPACE_METHODS, solve_subspace

from conftest import time_cuda

pytestmark = pytest.mark.bench

CPU_POLAR = [576, 1024]
GPU_POLAR = [4096, 5120, 8192]
CPU_APPLY = [(576, 1536), (1024, 4096)]
GPU_APPLY = [(d, n) for d in (4096, 5120, 8192) for n in (11008, 13824, 14336)]


def spd_problem(d, n_edit=1, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    P = (X @ X.T / (2 * d)).to(device, dtype)
    A = torch.randn(d, n_edit, generator=g, dtype=torch.float64).to(device, dtype)
    V = A + 0.3 * torch.randn(d, n_edit, generator=g, dtype=torch.float64).to(device, dtype)
    return P, A, V


def polar_sizes(device):
    return GPU_POLAR if device.type == "cuda" else CPU_POLAR


@pytest.mark.parametrize("method", ["svd", "eigh", "newton_schulz_fp32", "polar_express_fp32", "cupy_gesvd",
                                    "cupy_gesvdj", "subspace", "krylov", "randomized"])
@pytest.mark.parametrize("size_index", [0, 1, 2])
def test_polar(benchmark, device, record, method, size_index):
    sizes = polar_sizes(device)
    if size_index >= len(sizes):
        pytest.skip("size only on CUDA")
    d = sizes[size_index]
    if method.startswith("cupy") and (device.type != "cuda" or importlib.util.find_spec("cupy") is None):
        pytest.skip("cuSOLVER through CuPy needs CUDA and cupy")
    dtype = torch.float32 if device.type == "cuda" and method != "svd" else torch.float64
    P, A, V = spd_problem(d, device=device, dtype=dtype)
    M = 100.0 * P + V @ A.T
    if method in SUBSPACE_METHODS:
        fn = lambda: solve_subspace(P, A, V, 100.0, dtype, **SUBSPACE_METHODS[method])
    else:
        fn = lambda: POLAR_METHODS[method](M)
    if device.type == "cuda":
        record(time_cuda(fn), "polar", method, f"{d}x{d}", dtype)
    else:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
        record(benchmark, "polar", method, f"{d}x{d}", dtype)


@pytest.mark.parametrize("size_index", [0, 1, 2])
def test_torch_svd_baseline(benchmark, device, record, size_index):
    """torch.linalg.svd in float32 with the default driver: the reference the solve is judged by."""
    sizes = polar_sizes(device)
    if size_index >= len(sizes):
        pytest.skip("size only on CUDA")
    d = sizes[size_index]
    P, A, V = spd_problem(d, device=device, dtype=torch.float32)
    M = 100.0 * P + V @ A.T
    fn = lambda: torch.linalg.svd(M)
    if device.type == "cuda":
        record(time_cuda(fn), "polar", "torch.linalg.svd fp32", f"{d}x{d}", torch.float32)
    else:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
        record(benchmark, "polar", "torch.linalg.svd fp32", f"{d}x{d}", torch.float32)


def floor_note(device, precision: str, flop: float, nbytes: float) -> str:
    """The floor of the precision a variant computes in, at this GPU's datasheet peak (gpu_check's table)."""
    from gpu_check import floor_ms
    floor = floor_ms(torch.cuda.get_device_name(device), precision, flop, nbytes)
    return f"floor {floor[0]:.3f} ms ({floor[1]})" if floor else ""


def apply_shapes(device):
    return GPU_APPLY if device.type == "cuda" else CPU_APPLY


APPLY_VARIANTS = ["in-place", "in-place tf32x3", "out-of-place matmul"]


@pytest.mark.parametrize("variant", APPLY_VARIANTS)
@pytest.mark.parametrize("shape_index", range(9))
def test_orth_apply(benchmark, device, record, variant, shape_index):
    """In place with a float32 R (the default backend: Triton's IEEE fp32 dot on CUDA), Triton's
    tf32x3 dot, and the out-of-place torch.matmul in W's dtype (R rounded to it: the speed of the
    precision the in-place paths refuse)."""
    shapes = apply_shapes(device)
    if shape_index >= len(shapes):
        pytest.skip("shape only on CUDA")
    if variant == "in-place tf32x3" and device.type != "cuda":
        pytest.skip("Triton's tf32x3 dot is measured on CUDA")
    d, n = shapes[shape_index]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    W = torch.randn(d, n, device=device).to(dtype)
    R = torch.linalg.qr(torch.randn(d, d, device=device))[0]          # float32
    if variant == "in-place":
        fn = lambda: orth_matmul_(W, R)
    elif variant == "in-place tf32x3":
        fn = lambda: orth_matmul_triton_(W, R, precision="tf32x3")
    else:
        R_w = R.to(dtype)
        fn = lambda: torch.matmul(R_w, W)
    flop, nbytes = 2.0 * d * d * n, 2 * d * n * W.element_size() + d * d * R.element_size()
    if device.type == "cuda":
        record(time_cuda(fn), "orth_apply", variant, f"{d}x{n}", dtype, flop, nbytes,
               note=floor_note(device, {"in-place": "fp32", "in-place tf32x3": "3xtf32",
                                        "out-of-place matmul": "bf16"}[variant], flop, nbytes))
    else:
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
        record(benchmark, "orth_apply", variant, f"{d}x{n}", dtype, flop, nbytes)


@pytest.mark.parametrize("variant", ["crosscov", "torch addmm"])
@pytest.mark.parametrize("size_index", [0, 1, 2])
def test_crosscov(benchmark, device, record, variant, size_index):
    sizes = polar_sizes(device)
    if size_index >= len(sizes):
        pytest.skip("size only on CUDA")
    d, k = sizes[size_index], 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B = torch.randn(d, k, device=device).to(dtype)
    A = torch.randn(d, k, device=device).to(dtype)
    P = torch.randn(d, d, device=device)
    B32, At32 = B.float(), A.float().T          # the baseline's operands, prepared outside the timed call
    fn = (lambda: crosscov(B, A, P, 1.0, 100.0)) if variant == "crosscov" else \
        (lambda: torch.addmm(P, B32, At32, beta=100.0, alpha=1.0))
    flop = 2.0 * d * d * k
    nbytes = 2 * d * d * 4 + 2 * d * k * (B.element_size() if variant == "crosscov" else 4)
    if device.type == "cuda":
        record(time_cuda(fn), "crosscov", variant, f"{d}x{d}x{k}", dtype, flop, nbytes,
               note=floor_note(device, "bf16" if variant == "crosscov" else "fp32", flop, nbytes))
    else:
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
        record(benchmark, "crosscov", variant, f"{d}x{d}x{k}", dtype, flop, nbytes)
