"""‖RᵀR − I‖ is measured in float64 whatever R's dtype and the user's float32 matmul settings: a
float32 RᵀR carries rounding of its own as large as the error it measures (and TF32, ~1e-3 per entry,
far larger).  On the CPU the TF32 flag changes no product, so the tests check the measure against a
float64 reference, that the flags are as the user left them, and that every torch polar method
runs its products inside ``full_precision_matmul``."""
from __future__ import annotations

import pytest
import torch

from mose_fast.backends import fp32_precision_state, set_fp32_precision_state
from mose_fast.solve.procrustes import orthogonality_error, solve_rotation


def reference(R: torch.Tensor) -> float:
    R64 = R.to(torch.float64)
    return float(torch.linalg.matrix_norm(R64.T @ R64 - torch.eye(R.shape[0], dtype=torch.float64)))


def nearly_orthogonal(d: int = 256, off: float = 1e-5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (Q + off * torch.randn(d, d, generator=g, dtype=torch.float64)).float()


@pytest.fixture
def user_tf32():
    saved = fp32_precision_state()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    before = fp32_precision_state()
    yield before
    set_fp32_precision_state(saved)


@pytest.mark.parametrize("off", [1e-5, 1e-6])
def test_float32_R_is_measured_in_float64(user_tf32, off):
    R = nearly_orthogonal(off=off)                  # ‖RᵀR − I‖_F ≈ 5e-3 / 5e-4
    want = reference(R)
    assert abs(orthogonality_error(R) - want) <= 1e-9 * want
    assert fp32_precision_state() == user_tf32      # the user's settings untouched


def test_exactly_orthogonal_float64_stays_at_float64_level():
    Q = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))[0]
    assert orthogonality_error(Q) <= 1e-12
    assert orthogonality_error(Q.float()) == pytest.approx(reference(Q.float()), rel=1e-9)


def test_float32_solve_reports_the_float64_measure_of_its_R(user_tf32):
    g = torch.Generator().manual_seed(3)
    d = 192
    X = torch.randn(d, 2 * d, generator=g)
    A = torch.randn(d, 2, generator=g)
    res = solve_rotation(X @ X.T / (2 * d), A, A + 0.3 * torch.randn(d, 2, generator=g), 10.0, dtype=torch.float32)
    assert res.R.dtype == torch.float32
    assert res.orth_error == pytest.approx(reference(res.R), rel=1e-9)
    assert res.orth_error <= 1e-5
    assert fp32_precision_state() == user_tf32


@pytest.mark.parametrize("method", ["svd", "eigh", "newton_schulz_fp32", "polar_express_fp32", "newton_schulz",
                                    "polar_express"])
def test_polar_methods_run_at_full_precision_under_global_tf32(user_tf32, monkeypatch, method):
    from mose_fast.solve import polar
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def matmul(a, b):
        seen.append(torch.get_float32_matmul_precision())
        return real_matmul(a, b)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    M = torch.randn(24, 24) + 6 * torch.eye(24)
    R = polar.POLAR_METHODS[method](M)
    assert seen and set(seen) == {"highest"}, set(seen)
    assert orthogonality_error(R) <= 1e-5
    monkeypatch.undo()
    assert fp32_precision_state() == user_tf32
