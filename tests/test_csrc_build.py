"""csrc compiles for Hopper with nvcc even without a GPU (a syntax or type error fails here);
its numerics are checked on a GPU by tests/kernels/test_kernels_gpu.py."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_orth_panel_compiles_for_sm90(tmp_path):
    out = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-c", str(ROOT / "csrc" / "orth_panel.cu"),
                          "-o", str(tmp_path / "orth_panel.o")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "orth_panel.o").stat().st_size > 0


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    for root in ([Path(nvcc).resolve().parents[1]] if nvcc else []) + [Path("/usr/local/cuda")]:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    return None


@pytest.mark.skipif(_cuda_include() is None or shutil.which("g++") is None, reason="no CUDA headers or g++")
def test_binding_syntax_checks_against_torch_headers(tmp_path):
    """binding.cpp (the panel loop with cuBLAS through ATen) parses and type-checks against the
    installed torch's C++ headers, as torch.utils.cpp_extension would build it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}"]
    # a CPU wheel ships the c10/cuda headers but not the one its CMake build generates; its
    # whole content in a CUDA build is this define
    macros = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.is_file():
        shim = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.insert(0, f"-I{tmp_path}")
    out = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=mose_fast_csrc",
                          *flags, str(ROOT / "csrc" / "binding.cpp")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


def test_extension_absent_without_cuda_is_a_fallback():
    import torch

    from mose_fast import cuda_ext
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cuda_ext.load() is None
    assert (cuda_ext.source_dir() / "orth_panel.cu").is_file()


# --- the toolchain check and the build lock (stand-ins: nvcc output strings, a lock file) -------------

NVCC_12_4 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Built on Tue_Feb_27_16:19:38_PST_2024
Cuda compilation tools, release 12.4, V12.4.99
Build cuda_12.4.r12.4/compiler.33961263_0"""
NVCC_13_0 = "Cuda compilation tools, release 13.0, V13.0.48\nBuild cuda_13.0.r13.0/compiler.36260728_0"


def test_nvcc_version_is_read_from_its_output():
    from mose_fast.cuda_ext import parse_nvcc_version
    assert parse_nvcc_version(NVCC_12_4) == (12, 4)
    assert parse_nvcc_version(NVCC_13_0) == (13, 0)
    assert parse_nvcc_version("command not found") is None


def test_nvcc_must_match_torchs_cuda_major_version():
    from mose_fast.cuda_ext import parse_nvcc_version, toolchain_status
    ok, why = toolchain_status("12.8", (parse_nvcc_version(NVCC_12_4), "nvcc 12.4 (/usr/local/cuda/bin/nvcc)"), True)
    assert ok and "matches" in why
    ok, why = toolchain_status("13.0", (parse_nvcc_version(NVCC_12_4), "nvcc 12.4 (/usr/local/cuda/bin/nvcc)"), True)
    assert not ok and "nvcc 12.4" in why and "CUDA 13.0" in why and "13.x" in why
    ok, why = toolchain_status("13.0", (None, "nvcc not found ($CUDA_HOME/bin, $PATH, /usr/local/cuda/bin)"), True)
    assert not ok and "nvcc not found" in why and "nvidia-cuda-nvcc" in why
    ok, why = toolchain_status(None, (parse_nvcc_version(NVCC_13_0), "nvcc 13.0"), True)
    assert not ok and "CPU build" in why
    ok, why = toolchain_status("13.0", (parse_nvcc_version(NVCC_13_0), "nvcc 13.0"), False)
    assert not ok and "ninja" in why


def test_nvcc_version_runs_the_compiler_it_finds(tmp_path, monkeypatch):
    from mose_fast import cuda_ext
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.6, V12.6.85'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert cuda_ext.nvcc_path() == str(fake)
    assert cuda_ext.nvcc_version() == ((12, 6), f"nvcc 12.6 ({fake})")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert cuda_ext.nvcc_version()[0] is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_build_lock_is_removed_live_one_kept(tmp_path):
    import os
    import time

    from mose_fast.cuda_ext import OWNER_FILE, clear_stale_lock
    assert clear_stale_lock(tmp_path) is None                        # no lock
    lock, owner = tmp_path / "lock", tmp_path / OWNER_FILE
    lock.touch()
    owner.write_text(str(_dead_pid()))                               # a build killed half way
    msg = clear_stale_lock(tmp_path, max_age_s=300)
    assert msg and "is gone" in msg and not lock.exists() and not owner.exists()
    lock.touch()
    owner.write_text(str(os.getppid()))                              # a build still running elsewhere
    assert clear_stale_lock(tmp_path, max_age_s=300) is None and lock.exists()
    old = time.time() - 1000
    os.utime(lock, (old, old))                                       # ... for longer than a build takes
    msg = clear_stale_lock(tmp_path, max_age_s=300)
    assert msg and "1000 s old" in msg and not lock.exists()
    lock.touch()
    owner.write_text(str(os.getpid()))                               # this process's own build
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path, max_age_s=300) is None and lock.exists()


def test_load_clears_a_stale_lock_instead_of_waiting_for_ever(tmp_path, monkeypatch):
    """torch's load() waits while the build folder's lock exists: a lock left by a killed build must be
    gone before it is called."""
    import torch.utils.cpp_extension as cpp

    from mose_fast import cuda_ext
    (tmp_path / "lock").touch()
    (tmp_path / cuda_ext.OWNER_FILE).write_text(str(_dead_pid()))
    monkeypatch.setattr(cuda_ext, "csrc_status", lambda: (True, "stand-in toolchain"))
    monkeypatch.setattr(cuda_ext, "build_dir", lambda: tmp_path)

    def fake_build(**kw):
        if (tmp_path / "lock").exists():
            raise TimeoutError("would wait for ever on the lock")
        return "module"
    monkeypatch.setattr(cpp, "load", fake_build)
    cuda_ext.load.cache_clear()
    try:
        assert cuda_ext.load() == "module"
        assert not (tmp_path / cuda_ext.OWNER_FILE).exists()        # its own marker is gone after the build
    finally:
        cuda_ext.load.cache_clear()


def test_turned_off_or_absent_says_why(monkeypatch):
    from mose_fast import cuda_ext
    monkeypatch.setenv("MOSE_CSRC", "0")
    monkeypatch.setenv("MOSE_CSRC_REASON", "the build step did not finish within 120 s")
    cuda_ext.load.cache_clear()
    try:
        assert cuda_ext.load() is None
        assert cuda_ext.unavailable_reason() == "turned off (MOSE_CSRC=0: the build step did not finish within 120 s)"
    finally:
        cuda_ext.load.cache_clear()
