"""Kernels and CuPy calls run on the tensor's GPU, not the current one (``--device cuda:1``, a
device_map): the launchers enter ``torch.cuda.device(t.device)`` around every launch, as csrc does
with its device guard.  Without a GPU: a recording stand-in for ``torch.cuda.device`` and stubbed
launches."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from mose_fast import backends


class Recorder:
    """Stands in for torch.cuda.device: records the index entered and whether a block is inside."""
    def __init__(self):
        self.entered, self.depth = [], 0

    def __call__(self, device):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.entered.append(torch.device(device).index)
                rec.depth += 1

            def __exit__(self, *exc):
                rec.depth -= 1
                return False
        return _Ctx()


@pytest.fixture
def cuda_device(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    return rec


def test_device_guard_enters_the_tensors_device(cuda_device):
    with backends.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):
        assert cuda_device.depth == 1
    assert cuda_device.entered == [1] and cuda_device.depth == 0
    with backends.device_guard(torch.zeros(2)):           # a CPU tensor: nothing to guard
        pass
    assert cuda_device.entered == [1]


class KernelStub:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records whether the launch happened
    inside the guard of the tensor it was meant for."""
    def __init__(self, guard_log):
        self.launches, self.guard_log = [], guard_log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.launches.append(list(self.guard_log))
        return launch


def recording_guard(log):
    import contextlib

    @contextlib.contextmanager
    def guard(t):
        log.append(id(t))
        try:
            yield
        finally:
            log.pop()
    return guard


def guarded_stub(monkeypatch, module, kernel: str):
    """The module's kernel replaced by a stub that records which guards it was launched inside."""
    if module.triton is None:
        pytest.skip("triton not installed")
    log: list = []
    stub = KernelStub(log)
    monkeypatch.setattr(module, "device_guard", recording_guard(log))
    monkeypatch.setattr(module, kernel, stub)
    return log, stub


def test_orth_matmul_triton_launches_inside_ws_device_guard(monkeypatch):
    from mose_fast.kernels import orth_matmul as om
    log, stub = guarded_stub(monkeypatch, om, "_orth_matmul_kernel")
    W, R = torch.randn(64, 300), torch.eye(64)
    om.orth_matmul_triton_(W, R, workspace_fraction=0.1)
    assert len(stub.launches) > 1                                 # several panels, each launched ...
    assert all(inside == [id(W)] for inside in stub.launches)   # ... inside W's guard
    assert log == []


def test_crosscov_triton_launches_inside_the_operands_device_guard(monkeypatch):
    from mose_fast.kernels import crosscov as cc
    log, stub = guarded_stub(monkeypatch, cc, "_crosscov_kernel")
    B, A, P = torch.randn(8, 3), torch.randn(5, 3), torch.randn(8, 5)
    cc.crosscov_triton(B, A, P, 1.0, 2.0)
    assert stub.launches == [[id(B)]]


def test_cupy_polar_runs_on_the_tensors_gpu(cuda_device, monkeypatch):
    """polar_cupy makes M's GPU current for torch and for CuPy around the cuSOLVER call."""
    from mose_fast.solve.polar import polar_cupy, polar_svd
    seen = []
    cupy_devices: list = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            cupy_devices.append(self.index)

        def __exit__(self, *exc):
            cupy_devices.pop()

    def svd(a, full_matrices=True):
        seen.append((cuda_device.depth, list(cupy_devices)))
        return np.linalg.svd(a, full_matrices=full_matrices)
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=Device)
    cupy.from_dlpack = lambda t: t.numpy()
    cupy.linalg = types.SimpleNamespace(svd=svd)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    X = torch.randn(6, 6, dtype=torch.float64)
    M = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1), contiguous=lambda: X)
    R = polar_cupy(M, "gesvd")
    assert seen == [(1, [1])] and cuda_device.entered == [1]
    assert torch.allclose(R, polar_svd(X), atol=1e-12)
