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

``full_precision_matmul()`` is the context manager (also a decorator) under which every float32
product that decides orthogonality is formed: it turns TF32 (and oneDNN's bf16/TF32 float32
modes) off for its extent and restores the caller's settings afterwards, exceptions included.
"""
from __future__ import annotations

import contextlib
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


# --- float32 matmul precision ----------------------------------------------------------------------
#
# torch keeps two sets of switches for reduced-precision float32 products, and checks on every read
# of a legacy switch that the two agree (it raises when they do not):
#   legacy: float32_matmul_precision ("highest" / "high" / "medium", also set by
#           torch.backends.cuda.matmul.allow_tf32) and cuDNN's allow_tf32;
#   new:    fp32_precision per (backend, op), "none" meaning "inherit from the parent":
#           generic/all → {cuda, mkldnn}/all → {matmul, conv, rnn}.
# The context manager saves every one of them, sets a consistent full-precision state, and
# restores the saved values exactly.

_FP32_KEYS = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
              ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))
_FULL_PRECISION_OPS = (("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
                       ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def fp32_precision_state() -> dict:
    """Every float32-precision switch of torch, as stored (not as resolved through inheritance).

    Reading a legacy switch raises when the per-op values disagree with it (a state torch itself
    produces, e.g. ``set_float32_matmul_precision("high")`` then ``cuda.matmul.allow_tf32 =
    False``), so the per-op values are set to "ieee" for the read, which satisfies every check,
    and put back before returning."""
    get, put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    state = {key: get(*key) for key in _FP32_KEYS}
    try:
        for key in _FULL_PRECISION_OPS:
            put(*key, "ieee")
        state["float32_matmul_precision"] = torch._C._get_float32_matmul_precision()
        try:
            state["cudnn_allow_tf32"] = torch._C._get_cudnn_allow_tf32()
        except RuntimeError:   # with conv = rnn = "ieee" the check fails only when the flag is True
            state["cudnn_allow_tf32"] = True
    finally:
        for key in _FP32_KEYS:
            put(*key, state[key])
    return state


def set_fp32_precision_state(state: dict) -> None:
    """Restore a state from ``fp32_precision_state``: the legacy switches first (each also writes
    some per-op values), then every per-op value as saved."""
    torch._C._set_float32_matmul_precision(state["float32_matmul_precision"])
    torch._C._set_cudnn_allow_tf32(state["cudnn_allow_tf32"])
    put = torch._C._set_fp32_precision_setter
    for key in _FP32_KEYS:
        put(*key, state[key])


@contextlib.contextmanager
def full_precision_matmul():
    """Full-precision float32 products (no TF32, no bf16 passes) for the extent of the block.

    Orthogonality is what MOSE preserves, and TF32's 10-bit mantissa leaves ‖RᵀR − I‖ near 1e-3;
    a global ``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high")`` would otherwise reach the solve and the apply.
    Sets the legacy and the per-op switches consistently (cuBLAS, cuDNN, oneDNN), restores the
    caller's settings on exit, exceptions included.  The switches are process-global: another
    thread's products during the block run at full precision too."""
    saved = fp32_precision_state()
    try:
        torch._C._set_float32_matmul_precision("highest")
        torch._C._set_cudnn_allow_tf32(False)
        put = torch._C._set_fp32_precision_setter
        for key in _FULL_PRECISION_OPS:
            put(*key, "ieee")
        yield
    finally:
        set_fp32_precision_state(saved)
