"""Per-operation backend choice: torch (reference, always there), triton, cupy, cuda (csrc).

| variable                  | values                          | default                                   |
|---------------------------|---------------------------------|-------------------------------------------|
| MOSE_BACKEND              | torch, auto                     | auto: fastest present backend per op      |
| MOSE_BACKEND_ORTH_MATMUL  | torch, triton, cuda             | triton on CUDA when triton is importable  |
| MOSE_BACKEND_CROSSCOV     | torch, triton                   | triton on CUDA when triton is importable  |
| MOSE_BACKEND_POLAR        | torch, cupy                     | torch                                     |

A per-op variable wins over MOSE_BACKEND.  Capability checks are lazy (nothing here touches CUDA
at import) and report False under TRITON_INTERPRET=1, where Triton runs only when asked for by
name.  A backend that is asked for but absent is a logged fallback to torch, never a crash.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

OPS = ("orth_matmul", "crosscov", "polar")
BACKENDS = {"orth_matmul": ("torch", "triton", "cuda"), "crosscov": ("torch", "triton"), "polar": ("torch", "cupy")}


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None


def _present(backend: str, tensor: torch.Tensor | None) -> bool:
    on_cuda = tensor is not None and tensor.is_cuda
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_available() and (on_cuda or interpreter_mode())
    if backend == "cupy":
        return on_cuda and cupy_available()
    if backend == "cuda":   # csrc, built lazily; a failed build falls back inside the op
        return on_cuda
    return False


def choose(op: str, tensor: torch.Tensor | None = None) -> str:
    """The backend that runs ``op`` on ``tensor``'s device."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; known: {OPS}")
    asked = os.environ.get(f"MOSE_BACKEND_{op.upper()}") or os.environ.get("MOSE_BACKEND", "auto")
    if asked not in ("auto",) + BACKENDS[op]:
        raise ValueError(f"MOSE_BACKEND{'_' + op.upper()} = {asked!r}: choose from {('auto',) + BACKENDS[op]}")
    if asked != "auto":
        if _present(asked, tensor):
            return asked
        log.warning("backend %s for %s is not usable here; falling back to torch", asked, op)
        return "torch"
    on_cuda = tensor is not None and tensor.is_cuda
    if op in ("orth_matmul", "crosscov") and on_cuda and triton_available() and not interpreter_mode():
        return "triton"
    return "torch"
