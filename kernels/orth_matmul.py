"""In-place orthogonal multiply ``W ← R·W`` without a second copy of W.

R·W needs every row of a column of W before any of that column may be overwritten, so W is
processed in column panels: ``ws = R·W[:, j:j+p]`` into a workspace of d_out × p, then written
back.  The panel width is chosen so the workspace bytes are at most 1/8 of W's (counting the
second buffer and wider elements when the product is formed in a wider compute dtype).  R is
an input, not workspace: pass it in the compute dtype to avoid a d_out × d_out cast copy.

Precision: R is never rounded below float32.  A bf16 R is orthogonal only to ~2⁻⁸, and its
diagonal entries near 1 round up to 1, so ‖W‖_F grows every edit; instead W is widened to
float32 (or float64) panel by panel, multiplied by a float32/float64 R with float32 accumulation,
and rounded once to W's dtype when stored.  Float32 products run under
``full_precision_matmul`` (no TF32), and the Triton dot uses ``input_precision="ieee"``.  Float64
W goes to the torch path (Triton's float64 dot is not supported everywhere it runs).

Stack, top to bottom in this file:
  * ``orth_matmul_reference``  — out-of-place float64 truth
  * ``orth_matmul_panels_``    — torch panel loop, in place (CPU path, and GPU fallback)
  * ``_orth_matmul_kernel`` / ``orth_matmul_triton_`` — Triton panel kernel and launcher
  * ``orth_matmul_``           — public in-place entry, dispatching on the backend
"""
from __future__ import annotations

import logging
import math

import torch

from mose_fast.backends import device_guard, full_precision_matmul

log = logging.getLogger(__name__)

# Panels take at most 1/8 of W's bytes; 0.12 leaves headroom under that bound for the small
# allocations every call makes besides the panels (views, allocator bookkeeping).
WORKSPACE_FRACTION = 0.12
# Row panels of orth_matmul_factored_right_ hold at least this many rows (see there).
RIGHT_PANEL_MIN_ROWS = 128

try:  # triton is an optional extra; nothing here touches CUDA at import
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def orth_matmul_reference(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """R·W in float64, out of place (the truth tests compare against)."""
    return R.to(torch.float64) @ W.to(torch.float64)


def panel_width(d_in: int, fraction: float = 1 / 8, w_itemsize: int = 4, compute_itemsize: int | None = None) -> int:
    """Columns per panel so that the workspace *bytes* stay within ``fraction`` of W's bytes.

    A compute dtype other than W's needs two panel buffers (the cast input and the product),
    each as wide as the compute dtype."""
    compute_itemsize = compute_itemsize or w_itemsize
    buffers = 1 if compute_itemsize == w_itemsize else 2
    widest = max(1, int(math.floor(d_in * fraction * w_itemsize / (compute_itemsize * buffers))))
    # Balance the panels (same count, widths within a few columns of each other): a last panel far
    # narrower than the rest sends the BLAS down another blocking path that allocates its own
    # packing buffers (seen with MKL: +1.9 MiB for a 1312-column tail after 3932-column panels).
    panels = math.ceil(d_in / widest)
    return math.ceil(d_in / panels)


def compute_dtype_for(w_dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype products are formed in: the one asked for (else W's), never below float32."""
    return torch.promote_types(compute_dtype or w_dtype, torch.float32)


def _check(W: torch.Tensor, R: torch.Tensor) -> None:
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be square, got {tuple(R.shape)}")
    if W.ndim != 2 or W.shape[0] != R.shape[0]:
        raise ValueError(f"W must be (d_out × d_in) with d_out = {R.shape[0]}, got {tuple(W.shape)}")
    if W.device != R.device:
        raise ValueError(f"W on {W.device} but R on {R.device}")


@torch.no_grad()
def orth_matmul_panels_(W: torch.Tensor, R: torch.Tensor, compute_dtype: torch.dtype | None = None,
                        workspace_fraction: float = WORKSPACE_FRACTION) -> torch.Tensor:
    """W ← R·W in place (W may be a transposed view), panel by panel; returns W.

    The product is formed in ``compute_dtype`` (default W's dtype), raised to at least float32,
    and rounded once to W's dtype when written back."""
    _check(W, R)
    compute_dtype = compute_dtype_for(W.dtype, compute_dtype)
    needs_cast = compute_dtype != W.dtype
    p = panel_width(W.shape[1], workspace_fraction, W.element_size(),
                    torch.empty((), dtype=compute_dtype).element_size())
    Rc = R.to(compute_dtype)
    ws = torch.empty((W.shape[0], p), dtype=compute_dtype, device=W.device)
    with full_precision_matmul():
        for j in range(0, W.shape[1], p):
            panel = W[:, j:j + p]
            # a contiguous d_out × n view of the flat workspace, also for the narrower last panel
            out = ws.view(-1)[:W.shape[0] * panel.shape[1]].view(W.shape[0], panel.shape[1])
            torch.matmul(Rc, panel.to(compute_dtype) if needs_cast else panel, out=out)
            panel.copy_(out)
    return W


def _factored_operands(W: torch.Tensor, Q: torch.Tensor, Rk: torch.Tensor, compute_dtype: torch.dtype | None,
                       right: bool) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    """Checked shapes of R = I + Q·(Rk − I)·Qᵀ acting on W's rows (``right``: on its columns), and
    the compute dtype, Q and Rk − I in it."""
    d, shape = (W.shape[1], "W (n × d)") if right else (W.shape[0], "W (d × n)")
    if Q.ndim != 2 or Q.shape[0] != d or Rk.shape != (Q.shape[1], Q.shape[1]):
        raise ValueError(f"need {shape}, Q (d × k), Rk (k × k); got {tuple(W.shape)}, {tuple(Q.shape)}, "
                         f"{tuple(Rk.shape)}")
    cd = compute_dtype_for(W.dtype, compute_dtype)
    return cd, Q.to(cd), Rk.to(cd) - torch.eye(Rk.shape[0], dtype=cd, device=Rk.device)


@torch.no_grad()
def orth_matmul_factored_(W: torch.Tensor, Q: torch.Tensor, Rk: torch.Tensor,
                          compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ← W + Q·((Rk − I)·(Qᵀ·W)) in place: R = I + Q·(Rk − I)·Qᵀ acting on a k-dimensional
    subspace.  Workspace k × d_in; O(d_out·d_in·k) instead of O(d_out²·d_in).  Q and Rk are used
    in ``compute_dtype`` (default W's dtype) raised to at least float32."""
    cd, Qc, D = _factored_operands(W, Q, Rk, compute_dtype, right=False)
    with full_precision_matmul():
        left = Qc @ D                                                                     # d × k
        if cd == W.dtype:
            W.addmm_(left, Qc.T @ W)          # extra memory: the k × d_in product only
            return W
        # wider compute dtype: panel by panel, so no full-size cast of W is ever held
        p = panel_width(W.shape[1], WORKSPACE_FRACTION, W.element_size(), torch.empty((), dtype=cd).element_size())
        for j in range(0, W.shape[1], p):
            panel = W[:, j:j + p]
            wide = panel.to(cd)
            panel.copy_(wide.addmm_(left, Qc.T @ wide))
    return W


@torch.no_grad()
def orth_matmul_factored_right_(W: torch.Tensor, Q: torch.Tensor, Rk: torch.Tensor,
                                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ← W·R in place, R = I + Q·(Rk − I)·Qᵀ:  W + ((W·Q)·(Rk − I))·Qᵀ, in row panels of W (each
    row of W·R depends on that row only), so a panel is contiguous and needs no transposed copy.
    O(d_out·d_in·k) + O(d_out·k²); workspace a panel in ``compute_dtype`` (default W's, at least
    float32) and its panel × k products.  Panels hold 1/8 of W's bytes but at least
    ``RIGHT_PANEL_MIN_ROWS`` rows: narrower ones run the products at half the speed (d_in = 1536,
    k = 660 on a 2-core CPU: 99 ms for 17-row panels, 47 for 144, 41 for one)."""
    cd, Qc, D = _factored_operands(W, Q, Rk, compute_dtype, right=True)
    with full_precision_matmul():
        if cd == W.dtype:
            W.addmm_((W @ Qc) @ D, Qc.T)
            return W
        rows = max(panel_width(W.shape[0], WORKSPACE_FRACTION, W.element_size(),
                               torch.empty((), dtype=cd).element_size()),
                   RIGHT_PANEL_MIN_ROWS)
        for i in range(0, W.shape[0], rows):
            panel = W[i:i + rows]
            wide = panel.to(cd)
            panel.copy_(wide.addmm_((wide @ Qc) @ D, Qc.T))
    return W


# --- Triton kernel -------------------------------------------------------------------------------

# Operand precision of the float32 dot: "ieee" is exact float32 (the default); "tf32x3" splits
# each operand into a TF32 high part and a TF32 low part and sums three tensor-core products
# (about float32 accuracy at a fraction of the cost; measured by benchmarks/gpu_check.py).
PRECISIONS = ("ieee", "tf32x3")

if triton is not None:
    @triton.jit
    def _orth_matmul_kernel(R_ptr, W_ptr, WS_ptr, M, N, col0,
                            stride_rm, stride_rk, stride_wm, stride_wn, stride_sm, stride_sn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr):
        """ws[:, n] = R·W[:, col0 + n] for one panel: float32 R, W tiles widened to float32 in
        registers, float32 accumulation into a float32 workspace."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            r = tl.load(R_ptr + rm[:, None] * stride_rm + rk[None, :] * stride_rk,
                        mask=(rm[:, None] < M) & (rk[None, :] < M), other=0.0)
            w = tl.load(W_ptr + rk[:, None] * stride_wm + (col0 + rn[None, :]) * stride_wn,
                        mask=(rk[:, None] < M) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(r, w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
        tl.store(WS_ptr + rm[:, None] * stride_sm + rn[None, :] * stride_sn,
                 acc.to(WS_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def orth_matmul_triton_(W: torch.Tensor, R: torch.Tensor, workspace_fraction: float = WORKSPACE_FRACTION,
                        BLOCK_M: int = 64, BLOCK_N: int = 64, BLOCK_K: int = 32,
                        precision: str = "ieee") -> torch.Tensor:
    """Triton launcher: each panel is computed into a float32 workspace, then copied over W, which
    rounds it once (round to nearest even) to W's dtype.  R is used in float32 (a float64 R is
    rounded to float32, a float32 R is used as given); float64 W goes to ``orth_matmul_panels_``.

    The rounding is left to torch's copy rather than done in the kernel's store: Triton's
    interpreter truncates float32 → bfloat16, and the copy rounds the same way on every device."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'mose-fast[triton]')")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check(W, R)
    if W.dtype == torch.float64:
        log.debug("orth_matmul: float64 W goes to the torch path")
        return orth_matmul_panels_(W, R, workspace_fraction=workspace_fraction)
    d_out, d_in = W.shape
    p = panel_width(d_in, workspace_fraction * W.element_size() / 4)    # one float32 panel
    R32 = R.to(torch.float32).contiguous()
    ws = torch.empty((d_out, p), dtype=torch.float32, device=W.device)
    # Triton launches on the current device: make it W's (``--device cuda:1``, a device_map)
    with full_precision_matmul(), device_guard(W):
        for j in range(0, d_in, p):
            n = min(p, d_in - j)
            grid = (triton.cdiv(d_out, BLOCK_M), triton.cdiv(n, BLOCK_N))
            _orth_matmul_kernel[grid](R32, W, ws, d_out, n, j,
                                      R32.stride(0), R32.stride(1), W.stride(0), W.stride(1),
                                      ws.stride(0), ws.stride(1),
                                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                      INPUT_PRECISION=precision)
            W[:, j:j + n].copy_(ws[:, :n])
    return W


def orth_matmul_(W: torch.Tensor, R: torch.Tensor, backend: str | None = None,
                 compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Public entry: W ← R·W in place through the chosen backend ("torch", "triton" or "cuda").

    Every backend forms the product in float32 or wider with R never rounded below float32;
    ``compute_dtype`` (float32 or float64) applies to the torch path.  Float64 W always takes
    the torch path."""
    from mose_fast.backends import choose
    backend = backend or choose("orth_matmul", W)
    if W.dtype == torch.float64 and backend != "torch":
        log.debug("orth_matmul: float64 W goes to the torch path, not %s", backend)
        backend = "torch"
    with full_precision_matmul():
        if backend == "cuda":
            from mose_fast.cuda_ext import orth_matmul_cuda_
            if orth_matmul_cuda_(W, R, WORKSPACE_FRACTION) is not None:
                return W
            backend = "triton"   # the extension could not be built (logged): next best
        if backend == "triton":
            return orth_matmul_triton_(W, R)
        return orth_matmul_panels_(W, R, compute_dtype=compute_dtype)
