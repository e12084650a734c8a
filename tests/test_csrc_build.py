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


def test_extension_absent_without_cuda_is_a_fallback():
    import torch
    from mose_fast import cuda_ext
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert cuda_ext.load() is None
    assert (cuda_ext.source_dir() / "orth_panel.cu").is_file()
