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
