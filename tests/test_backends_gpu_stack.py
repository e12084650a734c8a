"""The GPU stack checks that run without a GPU, with stand-in modules: ``have_cupy`` means CuPy imports
*and* its cuSOLVER SVD runs (else a skip with the reason, not a failure), the CuPy wheel follows
``torch.version.cuda``, and setup.py's extras say so."""
from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mose_fast import backends

ROOT = Path(__file__).resolve().parents[1]


class _Device:
    entered: list = []

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        _Device.entered.append(self.index)
        return self

    def __exit__(self, *exc):
        return False


def fake_cupy(svd) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.2.0"
    cupy.cuda = types.SimpleNamespace(Device=_Device)
    cupy.asarray = np.asarray
    cupy.asnumpy = np.asarray
    cupy.linalg = types.SimpleNamespace(svd=svd)
    return cupy


@pytest.fixture
def gpu_machine(monkeypatch):
    """torch sees one CUDA device; nothing is cached from earlier checks."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    _Device.entered = []
    backends.cupy_status.cache_clear()
    yield monkeypatch
    backends.cupy_status.cache_clear()


def test_cupy_missing(gpu_machine):
    gpu_machine.setitem(sys.modules, "cupy", None)          # import cupy raises ImportError
    ok, why = backends.cupy_status()
    assert not ok and why.startswith("cupy does not import (") and "Error" in why
    assert "gpu-cuda13" in why and not backends.have_cupy()


def test_cupy_imports_but_its_svd_fails(gpu_machine):
    def svd(a, compute_uv=True):
        raise RuntimeError("cuSOLVER: CUSOLVER_STATUS_NOT_INITIALIZED (libcusolver.so.11 for CUDA 12)")
    gpu_machine.setitem(sys.modules, "cupy", fake_cupy(svd))
    ok, why = backends.cupy_status(1)
    assert not ok and "cuSOLVER SVD fails on cuda:1" in why and "CUSOLVER_STATUS_NOT_INITIALIZED" in why
    assert "torch's CUDA 13.0" in why and "gpu-cuda13" in why
    assert _Device.entered == [1]                             # checked on the device asked about
    # a CUDA tensor asking for the cupy polar backend falls back to torch instead of failing
    gpu_machine.setenv("MOSE_BACKEND_POLAR", "cupy")
    assert backends.choose("polar", types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))) == "torch"


def test_cupy_fine(gpu_machine):
    calls = []

    def svd(a, compute_uv=True):
        calls.append(compute_uv)
        return np.linalg.svd(a, compute_uv=compute_uv)
    gpu_machine.setitem(sys.modules, "cupy", fake_cupy(svd))
    ok, why = backends.cupy_status()
    assert ok and "cupy 14.2.0" in why and calls == [False]
    backends.cupy_status()
    assert calls == [False]                                   # checked once per device
    gpu_machine.setenv("MOSE_BACKEND_POLAR", "cupy")
    assert backends.choose("polar", types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))) == "cupy"


def test_cupy_svd_with_wrong_values_is_not_usable(gpu_machine):
    gpu_machine.setitem(sys.modules, "cupy", fake_cupy(lambda a, compute_uv=True: np.zeros(4)))
    ok, why = backends.cupy_status()
    assert not ok and "wrong singular values" in why


def test_no_cupy_under_the_interpreter_or_without_cuda(monkeypatch):
    backends.cupy_status.cache_clear()
    try:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.cupy_status() == (False, "TRITON_INTERPRET=1 (CPU interpreter): CuPy needs a CUDA device")
        backends.cupy_status.cache_clear()
        monkeypatch.delenv("TRITON_INTERPRET")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert backends.cupy_status() == (False, "no CUDA device")
    finally:
        backends.cupy_status.cache_clear()


def test_cupy_wheel_follows_torchs_cuda():
    assert backends.cupy_wheel("12.8") == "cupy-cuda12x"
    assert backends.cupy_wheel("13.0") == "cupy-cuda13x"
    assert backends.cupy_wheel(None) is None and backends.cupy_wheel("9.2") is None
    assert "gpu-cuda12" in backends.install_hint("12.4") and "cupy-cuda12x" in backends.install_hint("12.4")
    assert "gpu-cuda13" in backends.install_hint("13.0")
    assert "CPU build" in backends.install_hint("")
    assert "'.[gpu]'" in backends.install_hint("9.2")


def test_setup_extras_name_the_cupy_wheel_per_cuda_major():
    tree = ast.parse((ROOT / "setup.py").read_text())
    env = {}
    for node in tree.body:                    # the module-level GPU and EXTRAS literals
        if isinstance(node, ast.Assign) and node.targets[0].id in ("GPU", "EXTRAS"):
            env[node.targets[0].id] = eval(compile(ast.Expression(node.value), "setup.py", "eval"), {}, env)
    extras = env["EXTRAS"]
    assert not any("cupy" in r for r in extras["gpu"])
    assert any(r.startswith("cupy-cuda12x") for r in extras["gpu-cuda12"])
    assert any(r.startswith("cupy-cuda13x") for r in extras["gpu-cuda13"])
    for name in ("gpu-cuda12", "gpu-cuda13"):
        assert set(extras["gpu"]) <= set(extras[name])
    for major, wheel in backends.CUPY_WHEELS.items():
        if f"gpu-cuda{major}" in extras:
            assert any(r.startswith(wheel) for r in extras[f"gpu-cuda{major}"])
