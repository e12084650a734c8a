"""1000 sequential rotations of a bf16 weight through every apply path that runs on the CPU.

A bf16 W is re-rounded to 8 significant bits after every rotation, whatever the path, and that
rounding alone moves ‖W‖_F and σ_max: with exact products rounded once per step, 1000 edit-like
rotations of a 96 × 160 matrix move them by 1–3e-3 and up to ~5e-3 (measured; a random walk
plus a small shrinking bias, since values near zero are denser).  What an apply path controls is
what it adds on top of that one rounding, so each step is compared with the ideal step
``bf16(R·W)`` (R float64, product float64, one rounding) taken from the *same* W, and the path's
excess log‖W‖ and log σ_max are summed over the 1000 steps: it must stay within 1e-3 (a correct
path adds ~1e-5: a few entries per step land on the other side of a rounding boundary).  The raw
drift from the start is checked too, against a bound that leaves room for the rounding walk.

Rounding R to bf16 first makes the excess ~0.5: the diagonal of an edit's R lies within 2⁻⁹ of 1
and rounds up to exactly 1, so every step scales W up (``test_rounding_R_to_bf16_fails``).
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from mose_fast.kernels.orth_matmul import orth_matmul_factored_, orth_matmul_panels_, orth_matmul_triton_

STEPS = 1000
SHAPE = (96, 160)
EXCESS_BOUND = 1e-3       # what the path adds to the one rounding per step, summed over the steps
RAW_BOUND = 2e-2          # drift from the start, the bf16 rounding walk included


@functools.lru_cache(maxsize=None)
def edit_rotations(d: int, steps: int, seed: int, k: int = 4, angle: float = 0.3) -> tuple:
    """Rotations shaped like MOSE edits: identity outside a random k-dimensional subspace, a turn
    of up to ``angle`` radians inside it.  (Q, Rk) pairs in float64, R = I + Q·(Rk − I)·Qᵀ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        Q = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        S = torch.randn(k, k, generator=g, dtype=torch.float64)
        S = S - S.T
        out.append((Q, torch.linalg.matrix_exp(angle * S / torch.linalg.matrix_norm(S, 2))))
    return tuple(out)


def sigma_max(W: torch.Tensor) -> float:
    W = W.double()
    return float(torch.linalg.eigvalsh(W @ W.T)[-1].sqrt())


def run(apply, w_dtype=torch.bfloat16, seed=0, steps=STEPS, shape=SHAPE, device="cpu"):
    """Apply ``steps`` rotations in place through ``apply(W, Q, Rk, R)``; returns the summed excess
    over the ideal one-rounding step and the raw drift, for ‖W‖_F and σ_max."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(100 + seed)).to(device, w_dtype)
    f0, s0 = float(W.double().norm()), sigma_max(W)
    excess_f = excess_s = 0.0
    eye = torch.eye(shape[0], dtype=torch.float64, device=device)
    eye_k = torch.eye(4, dtype=torch.float64, device=device)
    for Q, Rk in edit_rotations(shape[0], steps, seed):
        Q, Rk = Q.to(device), Rk.to(device)
        R = eye + Q @ (Rk - eye_k) @ Q.T
        ideal = (R @ W.double()).to(w_dtype)
        apply(W, Q, Rk, R)
        assert not torch.isnan(W).any()
        excess_f += math.log(float(W.double().norm()) / float(ideal.double().norm()))
        excess_s += math.log(sigma_max(W) / sigma_max(ideal))
    return dict(excess_f=excess_f, excess_s=excess_s,
                drift_f=float(W.double().norm()) / f0 - 1, drift_s=sigma_max(W) / s0 - 1)


def check(stats):
    assert abs(stats["excess_f"]) <= EXCESS_BOUND, stats
    assert abs(stats["excess_s"]) <= EXCESS_BOUND, stats
    assert abs(stats["drift_f"]) <= RAW_BOUND, stats
    assert abs(stats["drift_s"]) <= RAW_BOUND, stats


CPU_PATHS = {
    "panels, compute float32": lambda W, Q, Rk, R: orth_matmul_panels_(W, R, compute_dtype=torch.float32),
    "panels, compute float64": lambda W, Q, Rk, R: orth_matmul_panels_(W, R, compute_dtype=torch.float64),
    "panels, default compute": lambda W, Q, Rk, R: orth_matmul_panels_(W, R),
    "panels, float32 R": lambda W, Q, Rk, R: orth_matmul_panels_(W, R.float(), compute_dtype=torch.float32),
    "factored, compute float32": lambda W, Q, Rk, R: orth_matmul_factored_(W, Q, Rk, compute_dtype=torch.float32),
    "factored, compute float64": lambda W, Q, Rk, R: orth_matmul_factored_(W, Q, Rk, compute_dtype=torch.float64),
    "factored, default compute": lambda W, Q, Rk, R: orth_matmul_factored_(W, Q, Rk),
}


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
def test_thousand_bf16_rotations_torch_paths(path):
    check(run(CPU_PATHS[path]))


@pytest.mark.interp
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_thousand_bf16_rotations_triton():
    """The Triton launcher in the interpreter, bf16 W (its loads widen to float32 before the dot).
    One panel and one program per call (the interpreter's cost is per program); the panel loop
    and masking at other block sizes are covered by test_kernels_interp.py."""
    pytest.importorskip("triton")
    check(run(lambda W, Q, Rk, R: orth_matmul_triton_(W, R, workspace_fraction=4.0,
                                                      BLOCK_M=128, BLOCK_N=256, BLOCK_K=128)))


def test_rounding_R_to_bf16_fails():
    """The harness has teeth: the same loop with R rounded to the weight's dtype before an
    otherwise exact float32 product breaks both bounds by orders of magnitude.  (The factored
    form keeps its identity exact, so rounding Q and Rk costs far less — measured 1e-3 — which is
    why its casts are checked directly in test_apply_paths_never_narrow_the_rotation.)"""
    stats = run(lambda W, Q, Rk, R: orth_matmul_panels_(W, R.to(torch.bfloat16), compute_dtype=torch.float32))
    assert abs(stats["excess_f"]) > 100 * EXCESS_BOUND, stats
    assert abs(stats["drift_f"]) > RAW_BOUND, stats


def test_apply_paths_never_narrow_the_rotation(monkeypatch):
    """Every product the torch paths form with a bf16 W has float32-or-wider operands."""
    narrow = []
    real_matmul, real_mm = torch.matmul, torch.Tensor.__matmul__

    def spy_matmul(a, b, *args, **kwargs):
        narrow.extend(t.dtype for t in (a, b) if t.dtype.itemsize < 4)
        return real_matmul(a, b, *args, **kwargs)

    def spy_mm(a, b):
        narrow.extend(t.dtype for t in (a, b) if t.dtype.itemsize < 4)
        return real_mm(a, b)
    monkeypatch.setattr(torch, "matmul", spy_matmul)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy_mm)
    Q, Rk = edit_rotations(SHAPE[0], 1, 0)[0]
    R = torch.eye(SHAPE[0], dtype=torch.float64) + Q @ (Rk - torch.eye(4, dtype=torch.float64)) @ Q.T
    narrow.clear()
    for dtype in (torch.float64, torch.float32):
        W = torch.randn(*SHAPE).to(torch.bfloat16)
        orth_matmul_panels_(W, R.to(dtype))
        orth_matmul_factored_(W, Q.to(dtype), Rk.to(dtype))
        orth_matmul_panels_(W, R.to(dtype), compute_dtype=torch.bfloat16)      # raised to float32
        orth_matmul_factored_(W, Q.to(dtype), Rk.to(dtype), compute_dtype=torch.float16)
    assert not narrow, narrow
