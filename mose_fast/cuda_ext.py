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
        return build(name="mose_fast_csrc", sources=[str(src / "binding.cpp"), str(src / "orth_panel.cu")],
                     extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=False)
    except Exception as e:   # no nvcc / ninja, or a compiler error: fall back, say so once
        log.warning("mose_fast CUDA extension unavailable (%s); using the torch/triton paths", e)
        return None


def orth_matmul_cuda_(W: torch.Tensor, R: torch.Tensor, workspace_fraction: float,
                      gemm: str = "cublas") -> torch.Tensor | None:
    """W ← R·W in place through csrc: cuBLAS (``gemm="cublas"``) or the tiled kernel
    (``gemm="tiled"``) on column panels, two buffers within ``workspace_fraction`` of W's bytes;
    None if the extension is unavailable."""
    ext = load()
    if ext is None:
        return None
    from mose_fast.kernels.orth_matmul import panel_width
    panel = max(1, panel_width(W.shape[1], workspace_fraction, W.element_size()) // 2)
    return ext.orth_matmul_inplace(W, R.to(W.dtype).contiguous(), panel, gemm)
