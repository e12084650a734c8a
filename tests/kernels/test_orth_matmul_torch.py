"""The torch panel path of W ← R·W (the CPU path): accuracy and measured peak extra memory."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mose_fast.kernels.orth_matmul import orth_matmul_panels_, orth_matmul_reference, panel_width


def random_orthogonal(n, seed):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@pytest.mark.parametrize("d_out, d_in", [(67, 129), (257, 1000), (5, 3)])
@pytest.mark.parametrize("w_dtype, compute, tol", [(torch.float32, None, 1e-5), (torch.float32, torch.float64, 1e-6),
                                                   (torch.float64, None, 1e-13), (torch.bfloat16, torch.float32, 1e-2)])
def test_panels_match_float64(d_out, d_in, w_dtype, compute, tol, nan_poison):
    R = random_orthogonal(d_out, d_in)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2)).to(w_dtype)
    ref = orth_matmul_reference(R, W)
    orth_matmul_panels_(W, R, compute_dtype=compute)
    assert float((W.double() - ref).abs().max() / ref.abs().max()) <= tol


def test_panel_width_counts_bytes():
    assert panel_width(1000, 1 / 8, 4, 4) == 125
    assert panel_width(1000, 1 / 8, 4, 8) == 31       # two float64 buffers against float32 W
    assert panel_width(1000, 1 / 8, 2, 4) == 31       # bf16 W, float32 compute
    assert panel_width(3, 1 / 8) == 1


@pytest.mark.parametrize("d_in", [1000, 4096, 11008, 32768, 32769])
@pytest.mark.parametrize("fraction", [1 / 8, 0.12, 1 / 3])
def test_panels_are_balanced_and_within_the_bound(d_in, fraction):
    """Every panel fits the byte bound, and the last one is at most (panels − 1) columns narrower
    than the others (an unbalanced tail costs the BLAS extra packing buffers)."""
    p = panel_width(d_in, fraction)
    panels = -(-d_in // p)
    last = d_in - (panels - 1) * p
    assert p <= d_in * fraction
    assert 0 < last <= p and p - last < panels
    assert panel_width(32768, 0.12) == 3641          # 9 panels: eight of 3641 columns, one of 3640


MEASURE = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    import mose_fast
    from mose_fast.kernels.orth_matmul import orth_matmul_panels_
    torch.set_num_threads(1)
    d_out, d_in, compute = {d_out}, {d_in}, {compute}
    # R arrives in the compute dtype, as the editor passes it: the workspace measured is the
    # panels', not a cast copy of the input R
    R = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))[0].to(compute or torch.float32)
    # Warm the BLAS library's own buffers (a fixed cost, not a copy of W) with a panel-shaped
    # product *before* W exists, so this warm-up's peak stays below W's resident size.
    orth_matmul_panels_(torch.randn(d_out, d_in // 8), R, compute_dtype=compute, workspace_fraction=1.0)
    W = torch.randn(d_out, d_in)
    resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    # The high-water mark of this process's own memory map, reset here: ru_maxrss would also carry
    # the parent's resident size across fork and exec (a long pytest process's, for one).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = resident()
    orth_matmul_panels_(W, R, compute_dtype=compute{extra_args})
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    peak = int(status["VmHWM"].split()[0])
    print(json.dumps(dict(extra_kib=peak - base, w_kib=W.numel() * 4 / 1024)))
""")



@pytest.mark.parametrize("compute", ["None", "torch.float64"])
def test_peak_extra_memory_at_most_one_eighth_of_W(compute):
    """Run in a fresh process: its resident high-water mark during the call minus the resident size
    before it is the peak extra memory
    (W = 128 MiB float32; an out-of-place product would add 128 MiB)."""
    import pathlib
    root = str(pathlib.Path(__file__).resolve().parents[2])
    code = MEASURE.format(root=root, d_out=1024, d_in=32768, compute=compute, extra_args="")
    # A fixed mmap threshold: every large block is its own mapping, returned to the OS when freed,
    # so resident memory follows live allocations (glibc's dynamic threshold would hide them).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["extra_kib"] <= m["w_kib"] / 8, m


@pytest.mark.parametrize("d_out, d_in, k", [(300, 40, 7), (5, 24, 24), (129, 64, 1)])
@pytest.mark.parametrize("w_dtype, compute, tol", [(torch.float32, None, 1e-5), (torch.float32, torch.float64, 1e-6),
                                                   (torch.float64, None, 1e-13), (torch.bfloat16, torch.float32, 1e-2)])
def test_factored_right_multiply_matches_float64(d_out, d_in, k, w_dtype, compute, tol):
    """W ← W·R, R = I + Q·(Rk − I)·Qᵀ, in row panels (300 rows: three panels of the minimum 128) equals
    the float64 W·R; Rotation.apply_right_ takes this path for a factored rotation and a contiguous W,
    and the transposed one otherwise, with the same result."""
    from mose_fast.kernels.orth_matmul import orth_matmul_factored_right_
    from mose_fast.rules.rotation import Rotation
    Q = random_orthogonal(d_in, 3)[:, :k]
    Rk = random_orthogonal(k, 4)
    R = torch.eye(d_in, dtype=torch.float64) + Q @ (Rk - torch.eye(k, dtype=torch.float64)) @ Q.T
    W0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(5)).to(w_dtype)
    ref = W0.double() @ R
    W = W0.clone()
    orth_matmul_factored_right_(W, Q, Rk, compute_dtype=compute)
    assert float((W.double() - ref).abs().max() / ref.abs().max()) <= tol
    via_rule, via_transposed = W0.clone(), W0.T.contiguous().T         # contiguous / a transposed view
    Rotation(Q=Q, Rk=Rk).apply_right_(via_rule)
    Rotation(Q=Q, Rk=Rk).apply_right_(via_transposed)
    for out in (via_rule, via_transposed):
        assert (float((out.double() - ref).abs().max() / ref.abs().max())
                <= max(tol, 1e-6 if w_dtype == torch.float32 else tol))
