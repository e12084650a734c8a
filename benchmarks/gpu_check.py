"""One-command GPU check: the GPU tests, then a benchmark subset, within a hard time budget.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run        # what would run, and its estimated seconds
    python benchmarks/gpu_check.py --budget-s 300 --no-tests

1. ``pytest -m gpu tests`` (tests/kernels/test_kernels_gpu.py and any other GPU-marked test; it
   also builds the csrc extension), stopped at ``--tests-s`` seconds;
2. benchmarks in a child process, most important first: W ← R·W at LLaMA-2-13B down_proj size
   (5120 × 13824, bf16 W, float32 R) through every backend and against torch.matmul baselines,
   the fused cross-covariance, the float32 polar methods (cuSOLVER gesvd/gesvdj when CuPy is
   installed) at d = 4096 and 5120, the 7B apply shape, then the float64 solves.  Each figure is appended to
   benchmarks/results.csv as soon as it is measured; an item whose estimate no longer fits the
   budget is skipped, and the child is killed at the deadline whatever it is doing.  The summary
   names everything skipped.

Needs a CUDA device, torch, triton and pytest; CuPy (the ``gpu`` extra) is optional.  Exits 2
without CUDA, 1 if a test failed or a benchmark raised, 0 otherwise (budget skips included).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HARD_LIMIT_S = 480          # the whole check, tests and benchmarks: 8 minutes
TESTS_S = 270               # of which the GPU tests may take at most this
MARGIN_S = 10               # left at the end for the summary and process teardown
TEST_COMMAND = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "tests"]


@dataclasses.dataclass
class Item:
    name: str               # "op variant shape dtype", as the summary prints it
    est_s: float            # estimated wall time, compilation included
    run: Callable[[], None] | None = None
    needs_cupy: bool = False


def decide(item: Item, remaining_s: float, have_cupy: bool) -> str | None:
    """None to run the item now, else why it is skipped."""
    if item.needs_cupy and not have_cupy:
        return "cupy not installed"
    if item.est_s > remaining_s:
        return f"budget: needs ~{item.est_s:.0f} s, {max(0.0, remaining_s):.0f} s left"
    return None


def run_items(items: list[Item], deadline: float, have_cupy: bool, clock=time.monotonic, out=print) -> int:
    """Run the items in order while the budget lasts; one line per item (RAN / SKIP / FAIL).
    Returns the number that raised."""
    failures = 0
    for item in items:
        reason = decide(item, deadline - clock(), have_cupy)
        if reason:
            out(f"SKIP {item.name}: {reason}")
            continue
        t = clock()
        try:
            item.run()
        except Exception as e:   # one broken benchmark must not hide the others
            failures += 1
            out(f"FAIL {item.name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        out(f"RAN {item.name} ({clock() - t:.1f} s)")
    return failures


# --- the benchmarks (CUDA only from here on; nothing runs at import) ----------------------------------

APPLY_SHAPES = [(5120, 13824), (4096, 11008)]       # LLaMA-2-13B and LLaMA-2-7B down_proj
APPLY_VARIANTS = ["triton ieee", "triton tf32x3", "cuda cublas", "cuda tiled", "torch panels fp32",
                  "torch.matmul bf16 R-rounded out-of-place", "torch.matmul fp32 out-of-place"]
POLAR_SIZES = [4096, 5120]
POLAR_FP32 = ["torch.linalg.svd", "newton_schulz_fp32", "polar_express_fp32", "cupy_gesvd", "cupy_gesvdj"]
POLAR_FP64 = ["svd", "cupy_gesvd", "cupy_gesvdj"]


def timed(fn, slow_budget_s: float = 20.0):
    """(p20, p50, p80) in ms: triton's do_bench for fast ops; for slow ones (a solve of seconds) a
    few synchronised runs after one warm-up, as many as fit ``slow_budget_s``."""
    import torch
    from conftest import time_cuda
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t
    if once < 0.05:
        return time_cuda(fn)
    samples = [once * 1e3]
    for _ in range(min(4, int(slow_budget_s / once))):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
    return pick(0.2), pick(0.5), pick(0.8)


def versions() -> str:
    import torch
    import triton
    return f"torch {torch.__version__}, triton {triton.__version__}"


def record(csv_path: Path, timing, op, variant, shape, dtype, flop=None, nbytes=None, note=""):
    import torch
    from conftest import append_row, device_name, make_row
    note = "; ".join(x for x in ("gpu-check", note, versions()) if x)
    append_row(make_row(device_name(torch.device("cuda")), timing, op, variant, shape, dtype, flop, nbytes, note),
               csv_path)


def apply_fn(variant: str, W, R):
    """(fn, in_place): the call to time, and whether it writes W (else it returns the product)."""
    import torch
    from mose_fast.cuda_ext import orth_matmul_cuda_
    from mose_fast.kernels.orth_matmul import orth_matmul_panels_, orth_matmul_triton_
    if variant == "triton ieee":
        return (lambda: orth_matmul_triton_(W, R)), True
    if variant == "triton tf32x3":
        return (lambda: orth_matmul_triton_(W, R, precision="tf32x3")), True
    if variant.startswith("cuda"):
        gemm = variant.split()[1]

        def run():
            if orth_matmul_cuda_(W, R, 0.12, gemm=gemm) is None:
                raise RuntimeError("the csrc extension did not build")
        return run, True
    if variant == "torch panels fp32":
        return (lambda: orth_matmul_panels_(W, R, compute_dtype=torch.float32)), True
    if variant.startswith("torch.matmul bf16"):
        R_w = R.to(W.dtype)
        return (lambda: torch.matmul(R_w, W)), False
    W32 = W.float()
    return (lambda: torch.matmul(R, W32)), False


def bench_apply(csv_path: Path, variant: str, d: int, n: int):
    """Time one apply and, on a fresh W, its accuracy: max error against the float64 product,
    share of entries off the correctly rounded result, and ‖W‖_F change of one apply."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(d + n)
    R = torch.linalg.qr(torch.randn(d, d, device="cuda", dtype=torch.float64, generator=g))[0]
    W = torch.randn(d, n, device="cuda", generator=g).to(torch.bfloat16)
    exact = R @ W.double()
    fn, in_place = apply_fn(variant, W, R.float())
    out = fn()
    got = W if in_place else out
    torch.cuda.synchronize()
    got64 = got.double()
    err = float((got64 - exact).abs().max() / exact.abs().max())
    off = float((got.to(torch.bfloat16) != exact.to(torch.bfloat16)).float().mean())
    dnorm = float(got64.norm() / exact.norm() - 1)
    del exact, got64
    W = torch.randn(d, n, device="cuda", generator=g).to(torch.bfloat16)
    timing = timed(apply_fn(variant, W, R.float())[0])
    flop = 2.0 * d * d * n
    nbytes = 2 * d * n * W.element_size() + d * d * 4
    record(csv_path, timing, "orth_apply", variant, f"{d}x{n}", torch.bfloat16, flop, nbytes,
           note=f"err {err:.1e}, off-rounding {off:.1e}, dnorm {dnorm:.1e}")


def bench_crosscov(csv_path: Path, variant: str, d: int, k: int = 64):
    import torch
    from mose_fast.kernels.crosscov import crosscov_reference, crosscov_torch, crosscov_triton
    B = torch.randn(d, k, device="cuda").to(torch.bfloat16)
    A = torch.randn(d, k, device="cuda").to(torch.bfloat16)
    P = torch.randn(d, d, device="cuda")
    fn = (lambda: crosscov_triton(B, A, P, 1.0, 100.0)) if variant == "triton" else \
        (lambda: crosscov_torch(B, A, P, 1.0, 100.0))
    ref = crosscov_reference(B, A, P, 1.0, 100.0)
    err = float((fn().double() - ref).abs().max() / ref.abs().max())
    flop, nbytes = 2.0 * d * d * k, 2 * d * d * 4 + 2 * d * k * 2
    record(csv_path, timed(fn), "crosscov", variant, f"{d}x{d}x{k}", torch.bfloat16, flop, nbytes,
           note=f"err {err:.1e}")


def bench_polar(csv_path: Path, method: str, d: int, dtype_name: str):
    import torch
    from mose_fast.solve.polar import POLAR_METHODS, polar_svd
    from mose_fast.solve.procrustes import orthogonality_error
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(d)
    X = torch.randn(d, 2 * d, device="cuda", dtype=torch.float64, generator=g)
    A = torch.randn(d, 1, device="cuda", dtype=torch.float64, generator=g)
    M = (100.0 * X @ X.T / (2 * d) + (A + 0.3 * torch.randn_like(A)) @ A.T).to(dtype)
    del X
    if method == "torch.linalg.svd":
        fn = lambda: polar_svd(M)
    else:
        fn = lambda: POLAR_METHODS[method](M)
    R = fn()
    note = f"orth {orthogonality_error(R.double()):.1e}"
    record(csv_path, timed(fn), "polar", method, f"{d}x{d}", dtype, note=note)


SMALL_APPLY_VARIANTS = ["triton ieee", "cuda cublas", "torch panels fp32", "torch.matmul bf16 R-rounded out-of-place"]
APPLY_EST_S = {"triton ieee": 15, "triton tf32x3": 15, "cuda cublas": 8, "cuda tiled": 8}


def bench_items(csv_path: Path) -> list[Item]:
    """Every benchmark, most important first, with a conservative estimate of its seconds (the
    first Triton call of a configuration compiles; csrc is built by the GPU tests before)."""
    items = []

    def add(name, est, fn, needs_cupy=False):
        items.append(Item(name, est, fn, needs_cupy))

    (d, n), (d_small, n_small) = APPLY_SHAPES[0], APPLY_SHAPES[1]
    for v in APPLY_VARIANTS:
        add(f"orth_apply {v} {d}x{n} bfloat16", APPLY_EST_S.get(v, 5), lambda v=v: bench_apply(csv_path, v, d, n))
    for size in POLAR_SIZES:
        for v in ("triton", "torch addmm"):
            add(f"crosscov {v} {size}x{size}x64 bfloat16", 5, lambda v=v, s=size: bench_crosscov(csv_path, v, s))
    for size in POLAR_SIZES:
        for m in POLAR_FP32:
            add(f"polar {m} {size}x{size} float32", 25 if m.startswith("cupy") else 15,
                lambda m=m, s=size: bench_polar(csv_path, m, s, "float32"), needs_cupy=m.startswith("cupy"))
    for v in SMALL_APPLY_VARIANTS:
        add(f"orth_apply {v} {d_small}x{n_small} bfloat16", APPLY_EST_S.get(v, 5),
            lambda v=v: bench_apply(csv_path, v, d_small, n_small))
    for size in POLAR_SIZES:
        for m in POLAR_FP64:
            add(f"polar {m} {size}x{size} float64", 40 if size == 4096 else 60,
                lambda m=m, s=size: bench_polar(csv_path, m, s, "float64"), needs_cupy=m.startswith("cupy"))
    return items


# --- driver ------------------------------------------------------------------------------------------

def worker(deadline_epoch: float, csv_path: Path) -> int:
    """The benchmark child: runs the items against a wall-clock deadline shared with the parent."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    os.environ.pop("TRITON_INTERPRET", None)
    have_cupy = importlib.util.find_spec("cupy") is not None
    failures = run_items(bench_items(csv_path), deadline_epoch, have_cupy, clock=time.time,
                         out=lambda line: print(line, flush=True))
    return 1 if failures else 0


def run_with_deadline(cmd: list[str], timeout_s: float, env: dict) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group (compilers it starts included), echoing its output;
    kill the whole group at the timeout.  Returns (exit status, or None if killed; output lines)."""
    lines: list[str] = []
    killed = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def kill(*_):
        killed.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    previous = signal.signal(signal.SIGALRM, kill)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, timeout_s))
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            print(f"  {line}", flush=True)
        proc.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return (None if killed else proc.returncode), lines


def print_plan(budget_s: float, tests_s: float, run_tests: bool, csv_path: Path) -> None:
    print(f"gpu-check plan (budget {budget_s:.0f} s, results appended to {csv_path}):")
    if run_tests:
        print(f"  tests (at most {tests_s:.0f} s): python {' '.join(TEST_COMMAND[1:])}")
    items = bench_items(csv_path)
    print(f"  benchmarks, in this order, while the budget lasts ({sum(i.est_s for i in items):.0f} s estimated "
          f"for all {len(items)}):")
    for item in items:
        print(f"    {item.name:<70} ~{item.est_s:>4.0f} s{'  (needs cupy)' if item.needs_cupy else ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=HARD_LIMIT_S, help=f"total seconds (at most {HARD_LIMIT_S})")
    ap.add_argument("--tests-s", type=float, default=TESTS_S, help="seconds the GPU tests may take")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--csv", type=Path, default=HERE / "results.csv")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.deadline_epoch, args.csv)
    budget = min(args.budget_s, HARD_LIMIT_S)
    if args.dry_run:
        print_plan(budget, args.tests_s, not args.no_tests, args.csv)
        return 0

    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False). It runs the GPU tests and "
              "GPU benchmarks and needs an NVIDIA GPU (H100/H200); `--dry-run` lists what it would run.",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    end = start + budget - MARGIN_S
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, budget {budget:.0f} s", flush=True)

    tests_status = "not run"
    if not args.no_tests:
        print(f"[tests] python {' '.join(TEST_COMMAND[1:])}", flush=True)
        rc, lines = run_with_deadline(TEST_COMMAND, min(args.tests_s, end - time.monotonic()), env)
        tests_status = "timed out" if rc is None else ("passed" if rc == 0 else f"failed (exit {rc})")
        if rc == 5:
            tests_status = "no GPU tests collected"

    bench_status, ran, skipped, failed = "not run", [], [], []
    if not args.no_bench:
        remaining = end - time.monotonic()
        print(f"[benchmarks] {remaining:.0f} s left", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--deadline-epoch",
               str(time.time() + remaining), "--csv", str(args.csv)]
        rc, lines = run_with_deadline(cmd, remaining + 2, env)
        ran = [l[4:] for l in lines if l.startswith("RAN ")]
        skipped = [l[5:] for l in lines if l.startswith("SKIP ")]
        failed = [l[5:] for l in lines if l.startswith("FAIL ")]
        reported = {l.rsplit(" (", 1)[0] for l in ran} | {l.split(": ", 1)[0] for l in skipped + failed}
        unreported = [i.name for i in bench_items(args.csv) if i.name not in reported]
        skipped += [f"{name}: budget (stopped at the deadline)" for name in unreported]
        bench_status = "stopped at the deadline" if rc is None else ("finished" if rc == 0 else f"exit {rc}")

    print(f"\ngpu-check summary ({time.monotonic() - start:.0f} s):")
    print(f"  tests: {tests_status}")
    print(f"  benchmarks: {bench_status}; {len(ran)} measured (rows appended to {args.csv}), "
          f"{len(skipped)} skipped, {len(failed)} failed")
    for line in skipped:
        print(f"    skipped {line}")
    for line in failed:
        print(f"    FAILED {line}")
    ok = (tests_status in ("passed", "not run") and not failed
          and bench_status in ("finished", "stopped at the deadline", "not run"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
