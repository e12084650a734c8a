"""Lazy build of the CUDA C++ extension (csrc/) with torch.utils.cpp_extension.load + ninja.

Built on first use on a CUDA machine, cached by torch in ~/.cache/torch_extensions (or
$TORCH_EXTENSIONS_DIR); a missing or mismatched toolchain or a failed build is a logged fallback
to the torch/triton paths, and ``unavailable_reason()`` says why.

What a build needs, checked before it starts (``csrc_status``): a CUDA device, a CUDA build of
torch, ninja, and ``nvcc`` (found as torch finds it: $CUDA_HOME/bin, $PATH, /usr/local/cuda/bin)
whose CUDA major version equals ``torch.version.cuda``'s — nvcc 12.x for a cu12x torch wheel,
13.x for cu13x.  ``MOSE_CSRC=0`` turns the extension off.

torch serialises builds through a ``lock`` file in the build folder and waits, without a limit,
while it exists; a build killed half way leaves it behind.  Before building, a lock whose builder
(recorded beside it in ``mose_build.pid``) is gone, or that is older than ``BUILD_TIMEOUT_S``, is
removed with a warning.

    python -m mose_fast.cuda_ext --build [--timeout-s 120]    # build now, say why not
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "mose_fast_csrc"
BUILD_TIMEOUT_S = 300          # a lock older than this is stale (a cold build takes about a minute)
OWNER_FILE = "mose_build.pid"  # the pid of the process building, beside torch's lock

_reason: list[str] = []        # why load() returned None (its last word)


def source_dir() -> Path:
    import mose_fast.csrc as csrc
    return Path(csrc.__file__).resolve().parent


def nvcc_path() -> str | None:
    """nvcc where torch.utils.cpp_extension looks for it: $CUDA_HOME (or $CUDA_PATH)/bin, then
    $PATH, then /usr/local/cuda/bin."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        path = Path(home) / "bin" / "nvcc"
        return str(path) if path.is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


_NVCC_RELEASE = re.compile(r"release (\d+)\.(\d+)")


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("Cuda compilation tools, release 12.4, V12.4.131")."""
    m = _NVCC_RELEASE.search(text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_version(path: str | None = None) -> tuple[tuple[int, int] | None, str]:
    """((major, minor) or None, what was found in words)."""
    path = path or nvcc_path()
    if path is None:
        return None, "nvcc not found ($CUDA_HOME/bin, $PATH, /usr/local/cuda/bin)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} --version failed ({type(e).__name__}: {e})"
    version = parse_nvcc_version(out.stdout + out.stderr)
    if version is None:
        return None, f"{path} --version printed no release number"
    return version, f"nvcc {version[0]}.{version[1]} ({path})"


def toolchain_status(torch_cuda: str | None, nvcc: tuple[tuple[int, int] | None, str],
                     have_ninja: bool) -> tuple[bool, str]:
    """Whether csrc can be built with this torch (``torch.version.cuda``), nvcc (``nvcc_version()``'s
    answer) and ninja, and why not."""
    if not torch_cuda:
        return False, "torch is a CPU build (torch.version.cuda is None)"
    version, found = nvcc
    major = int(torch_cuda.split(".")[0])
    if version is None:
        wheel = f"nvidia-cuda-nvcc-cu{major}" if major <= 12 else f"'nvidia-cuda-nvcc=={major}.*'"
        return False, (f"{found}; csrc needs the CUDA {major} compiler (the CUDA toolkit, or pip install "
                       f"{wheel} with CUDA_HOME set to its folder)")
    if version[0] != major:
        return False, (f"{found} but torch is built with CUDA {torch_cuda}: the extension needs an nvcc of "
                       f"the same major version ({major}.x)")
    if not have_ninja:
        return False, "ninja not found (pip install ninja)"
    return True, f"{found} matches torch's CUDA {torch_cuda}"


def csrc_status() -> tuple[bool, str]:
    """(buildable, why): CUDA present, not turned off, and ``toolchain_status``."""
    if os.environ.get("MOSE_CSRC", "1") == "0":
        because = os.environ.get("MOSE_CSRC_REASON")
        return False, f"turned off (MOSE_CSRC=0{': ' + because if because else ''})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from torch.utils.cpp_extension import is_ninja_available
    return toolchain_status(torch.version.cuda, nvcc_version(), is_ninja_available())


def build_dir() -> Path:
    """The folder torch builds the extension in (created if missing)."""
    from torch.utils.cpp_extension import _get_build_directory
    return Path(_get_build_directory(NAME, verbose=False))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process: alive
        return True
    return True


def clear_stale_lock(folder: Path, max_age_s: float = BUILD_TIMEOUT_S, now: float | None = None) -> str | None:
    """Remove torch's build ``lock`` in ``folder`` if its builder is gone (the pid in
    ``mose_build.pid`` no longer runs) or it is older than ``max_age_s``; the message said, or None
    when there is no lock or it belongs to a build still running."""
    lock = Path(folder) / "lock"
    owner = Path(folder) / OWNER_FILE
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    why = None
    try:
        pid = int(owner.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid == os.getpid():           # this process's own build, running
        return None
    if pid is not None and not _process_alive(pid):
        why = f"its builder (pid {pid}) is gone"
    elif age > max_age_s:
        why = f"it is {age:.0f} s old (a build takes at most {max_age_s:.0f} s)"
    if why is None:
        return None
    lock.unlink(missing_ok=True)
    owner.unlink(missing_ok=True)
    message = f"removed a stale torch extension build lock {lock}: {why}"
    log.warning(message)
    return message


@functools.lru_cache(maxsize=None)
def load():
    """The compiled module, or None (with a warning saying why; ``unavailable_reason()``)."""
    _reason.clear()
    ok, why = csrc_status()
    if not ok:
        _reason.append(why)
        if why != "no CUDA device":
            log.warning("mose_fast CUDA extension unavailable (%s); using the torch/triton paths", why)
        return None
    owner, done = None, threading.Event()
    try:
        from torch.utils.cpp_extension import load as build
        folder = build_dir()
        max_age = float(os.environ.get("MOSE_CSRC_BUILD_TIMEOUT_S", BUILD_TIMEOUT_S))
        clear_stale_lock(folder, max_age)
        owner = folder / OWNER_FILE
        if not (folder / "lock").exists():
            owner.write_text(str(os.getpid()))

        def watch():   # torch waits on another builder's lock without a limit: end the wait once it is stale
            while not done.wait(5.0):
                clear_stale_lock(folder, max_age)
        threading.Thread(target=watch, name="csrc-build-lock", daemon=True).start()
        src = source_dir()
        # no --use_fast_math: the panel GEMM accumulates in IEEE float32
        return build(name=NAME, sources=[str(src / "binding.cpp"), str(src / "orth_panel.cu")],
                     extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:   # a compiler error: fall back, say so once
        _reason.append(f"the build failed: {type(e).__name__}: {str(e)[-500:]}")
        log.warning("mose_fast CUDA extension unavailable (%s); using the torch/triton paths", e)
        return None
    finally:
        done.set()
        if owner is not None:
            with contextlib.suppress(OSError):
                if owner.read_text().strip() == str(os.getpid()):
                    owner.unlink()


def unavailable_reason() -> str | None:
    """Why ``load()`` returned None (None if it has not, or returned the module)."""
    return _reason[-1] if _reason else None


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


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mose_fast.cuda_ext", description="build the csrc extension now")
    ap.add_argument("--build", action="store_true", help="build (or load the cached build) and report")
    ap.add_argument("--timeout-s", type=float, default=BUILD_TIMEOUT_S,
                    help="a build lock older than this is stale")
    args = ap.parse_args(argv)
    ok, why = csrc_status()
    print(f"csrc toolchain: {why}", flush=True)
    if not args.build or not ok:
        return 0 if ok else 1
    os.environ["MOSE_CSRC_BUILD_TIMEOUT_S"] = str(args.timeout_s)
    t = time.perf_counter()
    ext = load()
    if ext is None:
        print(f"csrc: unavailable: {unavailable_reason()}", flush=True)
        return 1
    print(f"csrc: built or loaded in {time.perf_counter() - t:.1f} s ({build_dir()})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
