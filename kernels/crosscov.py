"""Cross-covariance ``M = α·B·Aᵀ + β·P`` with the scale-and-add fused into the GEMM epilogue.

In MOSE, ``B = V_E`` and ``A = A_E`` are d_out × n (n = keys in the edit) and ``P`` is the
retention Gram, so M = λ·P + V_E·A_Eᵀ is one pass over P instead of a GEMM, a scale and an add.
B and A may be bf16/fp16/fp32 (mixed precision by design); accumulation is fp32, P is read in its
dtype and widened to fp32, M is fp32 — nothing is rounded below fp32 after the operands.  Any
float64 operand sends the call to torch, which returns a float64 M.

Stack, top to bottom:
  * ``crosscov_reference`` — float64 truth
  * ``crosscov_torch``     — torch.addmm (CPU path and fallback)
  * ``_crosscov_kernel`` / ``crosscov_triton`` — Triton kernel and launcher
  * ``crosscov``           — public entry, dispatching on the backend
"""
from __future__ import annotations

import logging

import torch

from mose_fast.backends import device_guard, full_precision_matmul

log = logging.getLogger(__name__)

try:  # optional; nothing here touches CUDA at import
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def _check(B: torch.Tensor, A: torch.Tensor, P: torch.Tensor | None) -> None:
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[1]:
        raise ValueError(f"B (m × k) and A (n × k) must share k: got B {tuple(B.shape)}, A {tuple(A.shape)}")
    if P is not None and tuple(P.shape) != (B.shape[0], A.shape[0]):
        raise ValueError(f"P must be {(B.shape[0], A.shape[0])}, got {tuple(P.shape)}")


def crosscov_reference(B, A, P=None, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    M = alpha * (B.to(torch.float64) @ A.to(torch.float64).T)
    return M if P is None else M + beta * P.to(torch.float64)


def _has_float64(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def crosscov_torch(B, A, P=None, alpha: float = 1.0, beta: float = 1.0, out_dtype=None) -> torch.Tensor:
    """torch.addmm path; M in ``out_dtype``, by default float64 if any operand is, else float32."""
    _check(B, A, P)
    out_dtype = out_dtype or (torch.float64 if _has_float64(B, A, P) else torch.float32)
    with full_precision_matmul():
        prod = (B.to(out_dtype) @ A.to(out_dtype).T)
    return prod.mul_(alpha) if P is None else torch.add(prod.mul_(alpha), P.to(out_dtype), alpha=beta)


if triton is not None:
    @triton.jit
    def _crosscov_kernel(B_ptr, A_ptr, P_ptr, M_ptr, m, n, k, alpha, beta,
                         stride_bm, stride_bk, stride_an, stride_ak, stride_pm, stride_pn, stride_mm, stride_mn,
                         HAS_P: tl.constexpr, IEEE_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            b = tl.load(B_ptr + rm[:, None] * stride_bm + rk[None, :] * stride_bk,
                        mask=(rm[:, None] < m) & (rk[None, :] < k), other=0.0)
            a = tl.load(A_ptr + rn[None, :] * stride_an + rk[:, None] * stride_ak,   # Aᵀ tile, k × n
                        mask=(rn[None, :] < n) & (rk[:, None] < k), other=0.0)
            if IEEE_FP32:
                acc = tl.dot(b, a, acc, input_precision="ieee")
            else:
                acc = tl.dot(b, a, acc)
        acc = acc * alpha
        out_mask = (rm[:, None] < m) & (rn[None, :] < n)
        if HAS_P:   # fused epilogue: one read of P, one write of M
            p = tl.load(P_ptr + rm[:, None] * stride_pm + rn[None, :] * stride_pn, mask=out_mask, other=0.0)
            acc += beta * p.to(tl.float32)
        tl.store(M_ptr + rm[:, None] * stride_mm + rn[None, :] * stride_mn, acc, mask=out_mask)


def crosscov_triton(B, A, P=None, alpha: float = 1.0, beta: float = 1.0,
                    BLOCK_M: int = 64, BLOCK_N: int = 64, BLOCK_K: int = 32) -> torch.Tensor:
    """Triton launcher; returns a new fp32 M (float64 operands: ``crosscov_torch``'s float64 M)."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'mose-fast[triton]')")
    _check(B, A, P)
    if _has_float64(B, A, P):
        log.debug("crosscov: float64 operands go to the torch path")
        return crosscov_torch(B, A, P, alpha, beta)
    if B.dtype != A.dtype:
        raise ValueError(f"B and A must share a dtype, got {B.dtype} and {A.dtype}")
    m, n, k = B.shape[0], A.shape[0], B.shape[1]
    M = torch.empty((m, n), dtype=torch.float32, device=B.device)
    Pt = P if P is not None else M   # never read when HAS_P is False
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    with device_guard(B):   # Triton launches on the current device: make it the operands'
        _crosscov_kernel[grid](B, A, Pt, M, m, n, k, float(alpha), float(beta),
                               B.stride(0), B.stride(1), A.stride(0), A.stride(1), Pt.stride(0), Pt.stride(1),
                               M.stride(0), M.stride(1), HAS_P=P is not None, IEEE_FP32=B.dtype == torch.float32,
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return M


def crosscov(B, A, P=None, alpha: float = 1.0, beta: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Public entry: ``α·B·Aᵀ + β·P`` through the chosen backend; fp32, or float64 (torch) when
    any operand is float64."""
    from mose_fast.backends import choose
    backend = backend or choose("crosscov", B)
    if backend == "triton" and not _has_float64(B, A, P):
        return crosscov_triton(B, A, P, alpha, beta)
    return crosscov_torch(B, A, P, alpha, beta)
