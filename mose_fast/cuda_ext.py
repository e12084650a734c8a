"""Lazy build of the CUDA C++ extension (csrc/) with torch.utils.cpp_extension.load + ninja.

Built on first use on a CUDA machine, cached by torch in ~/.cache/torch_extensions; a missing
toolchain (nvcc, ninja) or a failed build is a logged fallback to the torch/triton paths."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def source_dir() -> Path:
    import mose_fast.csrc as csrc
    return Path(csrc.__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def load():
    """The compiled module, or None (with a warning saying why)."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load as build
        src = source_dir()
        # no --use_fast_math: the panel GEMM accumulates in IEEE float32
        return build(name="mose_fast_csrc", sources=[str(src / "binding.cpp"), str(src / "orth_panel.cu")],
                     extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:   # no nvcc / ninja, or a compiler error: fall back, say so once
        log.warning("mose_fast CUDA extension unavailable (%s); using the torch/triton paths", e)
        return None


def csrc_panel_width(d_in: int, w_itemsize: int, workspace_fraction: float, gemm: str = "cublas") -> int:
    """Columns per workspace buffer of csrc's panel loop: two buffers of float32 products, each
    with a float32 copy of the panel beside it when a half-precision W goes through cuBLAS, all
    within ``workspace_fraction`` of W's bytes."""
    from mose_fast.kernels.orth_matmul import panel_width
    per_buffer = 2 if gemm == "cublas" and w_itemsize < 4 else 1
    return max(1, panel_width(d_in, workspace_fraction * w_itemsize / (4 * 2 * per_buffer)))


def orth_matmul_cuda_(W: torch.Tensor, R: torch.Tensor, workspace_fraction: float,
                      gemm: str = "cublas") -> torch.Tensor | None:
    """W ← R·W in place through csrc: cuBLAS (``gemm="cublas"``) or the tiled kernel
    (``gemm="tiled"``) on column panels, two buffers within ``workspace_fraction`` of W's bytes;
    None if the extension is unavailable.  R goes in as float32 (never W's dtype), the product is
    float32 with TF32 off, rounded once to W's dtype; float64 W goes to the torch path."""
    from mose_fast.backends import full_precision_matmul
    from mose_fast.kernels.orth_matmul import orth_matmul_panels_
    if W.dtype == torch.float64:
        log.debug("orth_matmul_cuda_: float64 W goes to the torch path")
        return orth_matmul_panels_(W, R)
    ext = load()
    if ext is None:
        return None
    panel = csrc_panel_width(W.shape[1], W.element_size(), workspace_fraction, gemm)
    with full_precision_matmul():
        return ext.orth_matmul_inplace(W, R.to(torch.float32).contiguous(), panel, gemm)
