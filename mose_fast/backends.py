"""Per-operation backend choice: torch (reference, always there), triton, cupy, cuda (csrc).

| variable                  | values                          | default                                   |
|---------------------------|---------------------------------|-------------------------------------------|
| MOSE_BACKEND              | torch, auto                     | auto: fastest present backend per op      |
| MOSE_BACKEND_ORTH_MATMUL  | torch, triton, cuda             | triton on CUDA when triton is importable  |
| MOSE_BACKEND_CROSSCOV     | torch, triton                   | triton on CUDA when triton is importable  |
| MOSE_BACKEND_POLAR        | torch, cupy                     | torch                                     |
| MOSE_CSRC                 | 0, 1                            | 1: build csrc on first use (0: never)     |
| MOSE_OFFLOAD_RULE_STATE   | auto, 0, 1                      | auto: on when the edited weights are CUDA |
| MOSE_PIN_RULE_STATE       | 0, 1                            | 1: the offloaded rule state is pinned     |
| MOSE_PIN_UNDO_COPIES      | 0, 1                            | 0: undo copies in pageable host memory    |

A per-op variable wins over MOSE_BACKEND.  Capability checks are lazy (nothing here touches CUDA
at import) and report False under TRITON_INTERPRET=1, where Triton runs only when asked for by
name.  A backend that is asked for but absent is a logged fallback to torch, never a crash.

The last three are read by ``MOSEEditor`` (its arguments ``offload_rule_state`` and
``pin_undo_copies`` win over the variables of the same meaning):
with a model on a GPU each edited layer's rule state lives in host memory and only the layer being
solved has its state on the device; that host copy is pinned (allocated once, read every edit).
The undo history's copies of the edited matrices are written every edit and read only by an undo:
pinned, they would lock (undo_history + 1) × the edited matrices of page-locked host memory
(≈ 12 GB at 13B), so they are pageable unless asked for.

CuPy (cuSOLVER) must match the CUDA that torch was built with: ``cupy-cuda12x`` for CUDA 12,
``cupy-cuda13x`` for CUDA 13 (the ``gpu-cuda12`` / ``gpu-cuda13`` extras);
``python -m mose_fast.gpu_env --install-hint`` prints the command for this torch.
``have_cupy()`` is True only when CuPy imports *and* a tiny cuSOLVER SVD runs on the device;
``cupy_status()`` says why not.

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


def cuda_major(version: str | None) -> int | None:
    """12 for "12.8", None for None (a CPU build) or an unreadable string."""
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


# CuPy wheel per CUDA major version (CuPy ships one wheel per major: cupy-cuda12x, cupy-cuda13x, …)
CUPY_WHEELS = {12: "cupy-cuda12x", 13: "cupy-cuda13x"}    # the extras gpu-cuda12 / gpu-cuda13


def cupy_wheel(torch_cuda: str | None) -> str | None:
    """The CuPy wheel built for the same CUDA major version as torch (``torch.version.cuda``)."""
    major = cuda_major(torch_cuda)
    return None if major is None else CUPY_WHEELS.get(major)


def install_hint(torch_cuda: str | None = None) -> str:
    """The pip command that installs the GPU extras matching this torch's CUDA."""
    torch_cuda = torch.version.cuda if torch_cuda is None else torch_cuda
    wheel = cupy_wheel(torch_cuda)
    if not torch_cuda:
        return ("torch here is a CPU build (torch.version.cuda is None): install a CUDA build of torch first; "
                "the GPU extras need it")
    if wheel is None:
        return (f"torch is built with CUDA {torch_cuda}, for which no CuPy wheel is known here: "
                f"pip install -e '.[gpu]' (no CuPy; the cuSOLVER polar methods are skipped)")
    return f"pip install -e '.[gpu-cuda{cuda_major(torch_cuda)}]'   # torch CUDA {torch_cuda} -> {wheel}"


@functools.lru_cache(maxsize=None)
def cupy_status(device_index: int | None = None) -> tuple[bool, str]:
    """(usable, why): CuPy imports and a 4 × 4 cuSOLVER SVD gives the right singular values on
    ``device_index`` (default the current device).  Checked once per device; False with the reason
    under TRITON_INTERPRET=1, without CUDA, or when CuPy's CUDA runtime does not work next to
    torch's (a wheel for another CUDA major version)."""
    if interpreter_mode():
        return False, "TRITON_INTERPRET=1 (CPU interpreter): CuPy needs a CUDA device"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import cupy
    except Exception as e:   # not installed, or its CUDA libraries fail to load
        return False, f"cupy does not import ({type(e).__name__}: {str(e)[:200]}); {install_hint()}"
    try:
        index = torch.cuda.current_device() if device_index is None else device_index
        with cupy.cuda.Device(index):
            a = cupy.asarray([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
            s = cupy.linalg.svd(a, compute_uv=False)
            got = [float(x) for x in cupy.asnumpy(s)]
    except Exception as e:
        return False, (f"cupy {getattr(cupy, '__version__', '?')} imports but its cuSOLVER SVD fails on cuda:"
                       f"{device_index if device_index is not None else 'current'} ({type(e).__name__}: "
                       f"{str(e)[:200]}): its CUDA runtime likely does not match torch's CUDA "
                       f"{torch.version.cuda}; {install_hint()}")
    if [round(x, 6) for x in got] != [4.0, 3.0, 2.0, 1.0]:
        return False, f"cupy's cuSOLVER SVD gives wrong singular values {got} (expected 4, 3, 2, 1)"
    return True, f"cupy {getattr(cupy, '__version__', '?')}: cuSOLVER SVD runs on cuda:{index}"


def have_cupy(device_index: int | None = None) -> bool:
    """CuPy imports and its cuSOLVER SVD runs on the device (see ``cupy_status`` for the reason)."""
    return cupy_status(device_index)[0]


def device_guard(t) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(t.device)`` for a CUDA tensor (kernels launch and CuPy calls run on the
    tensor's GPU, not the current one), a no-op elsewhere."""
    device = t.device
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name} = {value!r}: choose from {allowed}")
    return value


def _present(backend: str, tensor: torch.Tensor | None) -> bool:
    on_cuda = tensor is not None and tensor.is_cuda
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_available() and (on_cuda or interpreter_mode())
    if backend == "cupy":
        return on_cuda and have_cupy(tensor.device.index)
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

