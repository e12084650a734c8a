"""One-command GPU check: preflight, csrc build, the GPU tests, then a benchmark subset, within a
hard time budget counted from the start of this process.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run        # preflight, and what would run, with its seconds
    python benchmarks/gpu_check.py --budget-s 300 --no-tests

0. preflight (a child process, at most ``PREFLIGHT_S``): GPU name and driver, torch and the CUDA it
   was built with, Triton, CuPy (and whether its cuSOLVER SVD runs), nvcc; what cannot run is decided
   here and named with the reason: Triton items without Triton, CuPy items without a working CuPy,
   csrc without an nvcc of torch's CUDA major version;
1. the csrc build (a child, at most ``CSRC_BUILD_S``): a stale torch build lock is removed first,
   and a build killed at the timeout leaves none; if it does not build, the tests and benchmarks
   run with ``MOSE_CSRC=0`` (skipped, with the reason);
2. ``pytest -m gpu tests`` (tests/kernels/test_kernels_gpu.py and any other GPU-marked test),
   stopped at ``--tests-s`` seconds;
3. benchmarks in a child process, most important first: W ← R·W at LLaMA-2-13B down_proj size
   (5120 × 13824, bf16 W, float32 R) through every backend and against torch.matmul baselines,
   the fused cross-covariance against a plain torch.addmm, the float32 polar methods (cuSOLVER
   gesvd/gesvdj when CuPy works) at d = 4096 and 5120, the 7B apply shape, then the float64 solves.
   Each figure is appended to benchmarks/results.csv as soon as it is measured, with the floor of
   the precision its variant computes in (bf16 or TF32 tensor cores, 3×TF32, IEEE fp32 FMA, HBM
   bandwidth) at the GPU's datasheet peak, printed beside it.  An item runs only while its
   estimate (seconds per call × the calls it makes, plus compilation and setup) fits what is left;
   the child is killed at the deadline whatever it is doing.  The summary names everything skipped.

The budget starts when this process started (not after ``import torch`` or CUDA's
initialisation): every step's deadline is measured from it.  Needs a CUDA device, torch, triton and
pytest; CuPy (the ``gpu-cuda12`` / ``gpu-cuda13`` extra matching ``torch.version.cuda``) and nvcc are
optional.  Exits 2 without CUDA, 1 if a test failed, the csrc build failed with a matching
toolchain, or a benchmark raised; 0 otherwise (budget skips included).
"""
from __future__ import annotations

import time

_IMPORTED_AT = time.time()      # before any other import: the budget's start if /proc says nothing

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HARD_LIMIT_S = 480          # the whole check, from process start to the summary: 8 minutes
PREFLIGHT_S = 30            # the preflight child at most (torch, CUDA, CuPy's first SVD)
CSRC_BUILD_S = 120          # the csrc build at most (a cold build of its two sources takes about a minute)
TESTS_S = 180               # the GPU tests at most
MARGIN_S = 10               # left at the end for the summary and process teardown
TEST_COMMAND = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "tests"]
BUILD_COMMAND = [sys.executable, "-m", "mose_fast.cuda_ext", "--build", "--timeout-s", str(CSRC_BUILD_S)]


def process_start_epoch(fallback: float = _IMPORTED_AT) -> float:
    """When this process started (Linux: /proc/self/stat's start time after boot + /proc/stat's
    boot time, which is rounded down, so the budget can only start early), else ``fallback``."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])           # field 22, starttime, in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        start = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return fallback
    return start if fallback - 60 <= start <= fallback else fallback


def deadline_from(process_start: float, budget_s: float, margin_s: float = MARGIN_S) -> float:
    """The epoch second by which everything but the summary must be done."""
    return process_start + min(budget_s, HARD_LIMIT_S) - margin_s


@dataclasses.dataclass
class Item:
    name: str                   # "op variant shape dtype", as the summary prints it
    per_call_s: float           # estimated seconds of one call of the timed function
    calls: int                  # calls the item makes: accuracy + timing probe + timed calls
    compile_s: float = 0.0      # one-time seconds: Triton compilation, operands, the float64 reference
    run: Callable[[], None] | None = None
    needs: tuple[str, ...] = ()  # of "triton", "cupy", "csrc"

    @property
    def est_s(self) -> float:
        return self.per_call_s * self.calls + self.compile_s


def decide(item: Item, remaining_s: float, unavailable: dict[str, str]) -> str | None:
    """None to run the item now, else why it is skipped."""
    for need in item.needs:
        if need in unavailable:
            return f"{need}: {unavailable[need]}"
    if item.est_s > remaining_s:
        return (f"budget: needs ~{item.est_s:.0f} s ({item.per_call_s:.3g} s × {item.calls} calls + "
                f"{item.compile_s:.0f} s), {max(0.0, remaining_s):.0f} s left")
    return None


def run_items(items: list[Item], deadline: float, unavailable: dict[str, str], clock=time.time, out=print) -> int:
    """Run the items in order while the budget lasts; one line per item (RAN / SKIP / FAIL).
    Returns the number that raised."""
    failures = 0
    for item in items:
        reason = decide(item, deadline - clock(), unavailable)
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


def plan_items(items: list[Item], available_s: float, unavailable: dict[str, str]) -> tuple[list, list]:
    """The worst case of ``run_items``: each item taking its estimate.  ([items planned], [(item,
    why skipped)])."""
    planned, skipped, left = [], [], available_s
    for item in items:
        reason = decide(item, left, unavailable)
        if reason:
            skipped.append((item, reason))
        else:
            planned.append(item)
            left -= item.est_s
    return planned, skipped


# --- floors: the datasheet peak of the precision a variant computes in ---------------------------------

@dataclasses.dataclass(frozen=True)
class Peaks:
    """Dense datasheet peaks: TFLOP/s per precision, HBM TB/s."""
    gpu: str
    bf16: float                 # bf16 / fp16 tensor cores, fp32 accumulation
    tf32: float                 # TF32 tensor cores
    fp32: float                 # IEEE fp32 FMA (CUDA cores)
    hbm_tbs: float


# most specific first: a device name is matched against each key in order
PEAKS = [
    ("H200", Peaks("H200 SXM", 989.0, 495.0, 67.0, 4.8)),
    ("H100 NVL", Peaks("H100 NVL", 835.0, 418.0, 60.0, 3.9)),
    ("H100 PCIe", Peaks("H100 PCIe", 756.0, 378.0, 51.0, 2.0)),
    ("H100", Peaks("H100 SXM", 989.0, 495.0, 67.0, 3.35)),
    ("A100", Peaks("A100 SXM", 312.0, 156.0, 19.5, 2.0)),
]
# what each precision's products cost, in units of its peak: 3×TF32 is three TF32 products
PRECISIONS = {"bf16": ("bf16", 1.0, "bf16 tensor cores"), "tf32": ("tf32", 1.0, "TF32 tensor cores"),
              "3xtf32": ("tf32", 3.0, "3×TF32 (three TF32 products)"), "fp32": ("fp32", 1.0, "IEEE fp32 FMA")}
APPLY_PRECISION = {"triton ieee": "fp32", "triton tf32x3": "3xtf32", "cuda cublas": "fp32", "cuda tiled": "fp32",
                   "torch panels fp32": "fp32", "torch.matmul bf16 R-rounded out-of-place": "bf16",
                   "torch.matmul fp32 out-of-place": "fp32"}
CROSSCOV_PRECISION = {"triton": "bf16", "torch addmm": "fp32"}


def peaks_for(device_name: str) -> Peaks | None:
    for key, peaks in PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def floor_ms(device_name: str, precision: str, flop: float, nbytes: float = 0.0) -> tuple[float, str] | None:
    """(floor in ms, how it was reached) of ``flop`` in ``precision`` and ``nbytes`` of HBM traffic on
    this GPU at its datasheet peaks: the larger of the compute and the memory time.  None for a GPU
    not in the table."""
    peaks = peaks_for(device_name)
    if peaks is None:
        return None
    unit, factor, words = PRECISIONS[precision]
    rate = getattr(peaks, unit) * 1e12
    compute_ms = factor * flop / rate * 1e3
    memory_ms = nbytes / (peaks.hbm_tbs * 1e12) * 1e3
    if compute_ms >= memory_ms:
        return compute_ms, f"{words} at {rate / factor / 1e12:.0f} TF/s, {peaks.gpu}"
    return memory_ms, f"HBM at {peaks.hbm_tbs:g} TB/s, {peaks.gpu}"


# --- the benchmarks (CUDA only from here on; nothing runs at import) ----------------------------------

APPLY_SHAPES = [(5120, 13824), (4096, 11008)]       # LLaMA-2-13B and LLaMA-2-7B down_proj
APPLY_VARIANTS = ["triton ieee", "triton tf32x3", "cuda cublas", "cuda tiled", "torch panels fp32",
                  "torch.matmul bf16 R-rounded out-of-place", "torch.matmul fp32 out-of-place"]
SMALL_APPLY_VARIANTS = ["triton ieee", "cuda cublas", "torch panels fp32", "torch.matmul bf16 R-rounded out-of-place"]
POLAR_SIZES = [4096, 5120]
POLAR_FP32 = ["torch.linalg.svd", "newton_schulz_fp32", "polar_express_fp32", "cupy_gesvd", "cupy_gesvdj"]
POLAR_FP64 = ["svd", "cupy_gesvd", "cupy_gesvdj"]

FAST_S = 0.05               # a call shorter than this is timed by triton's do_bench, else by repeats
SLOW_BUDGET_S = 8.0         # repeats of a slow call: as many as fit this, at most 4
DO_BENCH_WARMUP_MS, DO_BENCH_REP_MS, DO_BENCH_PROBE = 25, 100, 6


def planned_calls(per_call_s: float) -> int:
    """Calls of the timed function an item makes: one for accuracy (also the warm-up and the
    compilation), one timing probe, then do_bench (1 + 5 to estimate, then warm-up and repetitions
    for 25 + 100 ms) for a fast call, or up to 4 repeats within ``SLOW_BUDGET_S`` for a slow one."""
    if per_call_s < FAST_S:
        ms = per_call_s * 1e3
        return 2 + DO_BENCH_PROBE + max(1, int(DO_BENCH_WARMUP_MS / ms)) + max(1, int(DO_BENCH_REP_MS / ms))
    return 2 + min(4, int(SLOW_BUDGET_S / per_call_s))


# Seconds per call on an H100/H200-class GPU, set about twice the floor of the precision the call
# computes in (for the solves, from published cuSOLVER figures): budget estimates, never reported.
APPLY_PER_CALL_S = {"triton ieee": 0.04, "triton tf32x3": 0.015, "cuda cublas": 0.025, "cuda tiled": 0.06,
                    "torch panels fp32": 0.025, "torch.matmul bf16 R-rounded out-of-place": 0.002,
                    "torch.matmul fp32 out-of-place": 0.02}          # at 5120 × 13824; scaled by FLOP
APPLY_SETUP_S, TRITON_COMPILE_S = 1.5, 5.0
CROSSCOV_PER_CALL_S = {"triton": 0.0004, "torch addmm": 0.0006}       # at 5120² × 64
POLAR_PER_CALL_S = {   # (4096, 5120)
    ("torch.linalg.svd", "float32"): (4.0, 7.0), ("newton_schulz_fp32", "float32"): (1.0, 2.0),
    ("polar_express_fp32", "float32"): (0.5, 1.0), ("cupy_gesvd", "float32"): (5.0, 9.0),
    ("cupy_gesvdj", "float32"): (3.0, 6.0), ("svd", "float64"): (10.0, 18.0),
    ("cupy_gesvd", "float64"): (8.0, 15.0), ("cupy_gesvdj", "float64"): (5.0, 10.0)}
POLAR_SETUP_S = 1.0


def needs_of(variant: str) -> tuple[str, ...]:
    if variant.startswith("triton"):
        return ("triton",)
    if variant.startswith("cuda"):
        return ("csrc",)
    if variant.startswith("cupy"):
        return ("cupy",)
    return ()


def timed(fn):
    """(p20, p50, p80) in ms of ``fn``, which has run once already (the accuracy call): one probe,
    then triton's do_bench for a fast call, or up to 4 synchronised repeats for a slow one."""
    import torch

    from conftest import time_cuda
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t
    if once < FAST_S:
        return time_cuda(fn)
    samples = [once * 1e3]
    for _ in range(min(4, int(SLOW_BUDGET_S / once))):
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
    return f"torch {torch.__version__} CUDA {torch.version.cuda}, triton {triton.__version__}"


def record(csv_path: Path, timing, op, variant, shape, dtype, flop=None, nbytes=None, note="", precision=None):
    """Append the row and print it with its floor (the precision's datasheet peak on this GPU)."""
    import torch

    from conftest import append_row, device_name, make_row
    name = device_name(torch.device("cuda"))
    floor = floor_ms(name, precision, flop or 0.0, nbytes or 0.0) if precision else None
    floor_note = f"floor {floor[0]:.3f} ms ({floor[1]})" if floor else ""
    print(f"  row {op} {variant} {shape}: p50 {timing[1]:.3f} ms (p20 {timing[0]:.3f}, p80 {timing[2]:.3f})"
          + (f"; {floor_note}, {timing[1] / floor[0]:.2f}× the floor" if floor else ""), flush=True)
    note = "; ".join(x for x in ("gpu-check", note, floor_note, versions()) if x)
    append_row(make_row(name, timing, op, variant, shape, dtype, flop, nbytes, note), csv_path)


def apply_fn(variant: str, W, R):
    """The call to time: W ← R·W in place, or the out-of-place product for the baselines (W is not
    written).  Operands of the baselines are prepared here, outside the timed call."""
    import torch

    from mose_fast.cuda_ext import orth_matmul_cuda_, unavailable_reason
    from mose_fast.kernels.orth_matmul import orth_matmul_panels_, orth_matmul_triton_
    if variant == "triton ieee":
        return lambda: orth_matmul_triton_(W, R)
    if variant == "triton tf32x3":
        return lambda: orth_matmul_triton_(W, R, precision="tf32x3")
    if variant.startswith("cuda"):
        gemm = variant.split()[1]

        def run():
            if orth_matmul_cuda_(W, R, 0.12, gemm=gemm) is None:
                raise RuntimeError(f"the csrc extension is unavailable: {unavailable_reason()}")
        return run
    if variant == "torch panels fp32":
        return lambda: orth_matmul_panels_(W, R, compute_dtype=torch.float32)
    if variant.startswith("torch.matmul bf16"):
        R_w = R.to(W.dtype)
        return lambda: torch.matmul(R_w, W)
    W32 = W.float()
    return lambda: torch.matmul(R, W32)


def bench_apply(csv_path: Path, variant: str, d: int, n: int):
    """Accuracy on a fresh W (max error against the float64 product, share of entries off the
    correctly rounded result, ‖W‖_F change of one apply), then the timing on another W."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(d + n)
    R = torch.linalg.qr(torch.randn(d, d, device="cuda", dtype=torch.float64, generator=g))[0]
    R32 = R.float()
    W = torch.randn(d, n, device="cuda", generator=g).to(torch.bfloat16)
    exact = R @ W.double()
    del R
    in_place = not variant.startswith("torch.matmul")
    out = apply_fn(variant, W, R32)()
    got = W if in_place else out
    torch.cuda.synchronize()
    got64 = got.double()
    err = float((got64 - exact).abs().max() / exact.abs().max())
    off = float((got.to(torch.bfloat16) != exact.to(torch.bfloat16)).float().mean())
    dnorm = float(got64.norm() / exact.norm() - 1)
    del exact, got64, out, got
    W = torch.randn(d, n, device="cuda", generator=g).to(torch.bfloat16)
    fn = apply_fn(variant, W, R32)
    fn()                                  # the timed operands' first call (caches, workspaces)
    timing = timed(fn)
    flop = 2.0 * d * d * n
    nbytes = 2 * d * n * W.element_size() + d * d * 4
    record(csv_path, timing, "orth_apply", variant, f"{d}x{n}", torch.bfloat16, flop, nbytes,
           note=f"err {err:.1e}, off-rounding {off:.1e}, dnorm {dnorm:.1e}", precision=APPLY_PRECISION[variant])


def crosscov_fn(variant: str, B, A, P, lam: float):
    """The call to time for M = λ·P + B·Aᵀ: the fused kernel on B, A as given, or the baseline, one
    ``torch.addmm(P, B, Aᵀ, beta=λ, alpha=1)`` on float32 B and Aᵀ cast here, outside the call."""
    import torch
    if variant == "triton":
        from mose_fast.kernels.crosscov import crosscov_triton
        return lambda: crosscov_triton(B, A, P, 1.0, lam)
    B32, At32, P32 = B.float(), A.float().T, P.float()
    return lambda: torch.addmm(P32, B32, At32, beta=lam, alpha=1.0)


def bench_crosscov(csv_path: Path, variant: str, d: int, k: int = 64, lam: float = 100.0):
    """M = λ·P + B·Aᵀ: the fused Triton kernel on bf16 B, A; the baseline is one torch.addmm on
    float32 operands prepared outside the timed call (full-precision float32, torch's default)."""
    import torch

    from mose_fast.kernels.crosscov import crosscov_reference
    B = torch.randn(d, k, device="cuda").to(torch.bfloat16)
    A = torch.randn(d, k, device="cuda").to(torch.bfloat16)
    P = torch.randn(d, d, device="cuda")
    fn = crosscov_fn(variant, B, A, P, lam)
    nbytes = 2 * d * d * 4 + 2 * d * k * (2 if variant == "triton" else 4)
    ref = crosscov_reference(B, A, P, 1.0, lam)
    err = float((fn().double() - ref).abs().max() / ref.abs().max())
    del ref
    flop = 2.0 * d * d * k
    record(csv_path, timed(fn), "crosscov", variant, f"{d}x{d}x{k}", torch.bfloat16, flop, nbytes,
           note=f"err {err:.1e}", precision=CROSSCOV_PRECISION[variant])


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
    fn = (lambda: polar_svd(M)) if method == "torch.linalg.svd" else (lambda: POLAR_METHODS[method](M))
    R = fn()
    note = f"orth {orthogonality_error(R):.1e}"
    del R
    record(csv_path, timed(fn), "polar", method, f"{d}x{d}", dtype, note=note)


def bench_items(csv_path: Path) -> list[Item]:
    """Every benchmark, most important first, with its estimate: seconds per call × the calls it
    makes (``planned_calls``) + compilation and setup."""
    items = []

    def add(name, per_call, compile_s, fn, needs=()):
        items.append(Item(name, per_call, planned_calls(per_call), compile_s, fn, tuple(needs)))

    (d, n), (d_small, n_small) = APPLY_SHAPES[0], APPLY_SHAPES[1]
    for v in APPLY_VARIANTS:
        add(f"orth_apply {v} {d}x{n} bfloat16", APPLY_PER_CALL_S[v],
            APPLY_SETUP_S + (TRITON_COMPILE_S if v.startswith("triton") else 0.0),
            lambda v=v: bench_apply(csv_path, v, d, n), needs_of(v))
    for size in POLAR_SIZES:
        for v in ("triton", "torch addmm"):
            scale = (size / 5120) ** 2
            add(f"crosscov {v} {size}x{size}x64 bfloat16", CROSSCOV_PER_CALL_S[v] * scale,
                0.5 + (3.0 if v == "triton" else 0.0), lambda v=v, s=size: bench_crosscov(csv_path, v, s),
                needs_of(v))
    for size in POLAR_SIZES:
        for m in POLAR_FP32:
            add(f"polar {m} {size}x{size} float32", POLAR_PER_CALL_S[(m, "float32")][POLAR_SIZES.index(size)],
                POLAR_SETUP_S, lambda m=m, s=size: bench_polar(csv_path, m, s, "float32"), needs_of(m))
    scale = (2.0 * d_small * d_small * n_small) / (2.0 * d * d * n)
    for v in SMALL_APPLY_VARIANTS:
        add(f"orth_apply {v} {d_small}x{n_small} bfloat16", APPLY_PER_CALL_S[v] * scale,
            APPLY_SETUP_S + (TRITON_COMPILE_S if v.startswith("triton") else 0.0),
            lambda v=v: bench_apply(csv_path, v, d_small, n_small), needs_of(v))
    for size in POLAR_SIZES:
        for m in POLAR_FP64:
            add(f"polar {m} {size}x{size} float64", POLAR_PER_CALL_S[(m, "float64")][POLAR_SIZES.index(size)],
                POLAR_SETUP_S, lambda m=m, s=size: bench_polar(csv_path, m, s, "float64"), needs_of(m))
    return items


# --- preflight -----------------------------------------------------------------------------------------

def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
        return f"unknown (nvidia-smi exit {out.returncode})"
    except FileNotFoundError:
        return "unknown (nvidia-smi not found)"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown (nvidia-smi: {type(e).__name__})"


def preflight_report() -> dict:
    """What this machine has and what cannot run, with the reasons (run in a child process)."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    from mose_fast import backends, cuda_ext
    rep: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "driver": _driver_version()}
    unavailable: dict[str, str] = {}
    cuda = torch.cuda.is_available()
    rep["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    if not cuda:
        unavailable["cuda"] = ("no CUDA device (torch.cuda.is_available() is False"
                               + ("; torch is a CPU build" if not torch.version.cuda else "") + ")")
    try:
        import triton
        rep["triton"] = triton.__version__
    except Exception as e:
        rep["triton"] = None
        unavailable["triton"] = f"triton does not import ({type(e).__name__}: {e}); pip install triton"
    import importlib.util
    ok, why = backends.cupy_status()
    installed = importlib.util.find_spec("cupy") is not None
    rep["cupy"] = why if ok or "does not import" in why else f"{'installed' if installed else 'not installed'}; {why}"
    if not ok:
        unavailable["cupy"] = why if installed or "does not import" in why else f"not installed ({why})"
    version, found = cuda_ext.nvcc_version()
    rep["nvcc"] = found
    from torch.utils.cpp_extension import is_ninja_available
    csrc_ok, csrc_why = cuda_ext.toolchain_status(torch.version.cuda, (version, found), is_ninja_available())
    if csrc_ok and not cuda:
        csrc_ok, csrc_why = False, "no CUDA device"
    rep["csrc"] = csrc_why
    if not csrc_ok:
        unavailable["csrc"] = csrc_why
    else:
        rep["csrc_build_dir"] = str(cuda_ext.build_dir())
    rep["install_hint"] = backends.install_hint()
    rep["unavailable"] = unavailable
    return rep


def print_preflight(rep: dict, seconds: float) -> None:
    print(f"[preflight] ({seconds:.1f} s)")
    gpus = rep.get("gpus") or []
    print(f"  GPU: {', '.join(f'cuda:{i} {n}' for i, n in enumerate(gpus)) if gpus else 'none'}")
    print(f"  driver: {rep.get('driver')}")
    print(f"  torch {rep.get('torch')}, built with CUDA {rep.get('torch_cuda') or 'none (CPU build)'}")
    print(f"  triton: {rep.get('triton') or 'not installed'}")
    print(f"  cupy: {rep.get('cupy')}")
    print(f"  nvcc: {rep.get('nvcc')}")
    print(f"  csrc: {rep.get('csrc')}")
    print(f"  GPU extras for this torch: {rep.get('install_hint')}")
    unavailable = rep.get("unavailable", {})
    if unavailable:
        print("  cannot run here:")
        for what, why in unavailable.items():
            label = {"cuda": "anything on a GPU", "triton": "Triton items", "cupy": "CuPy (cuSOLVER) items",
                     "csrc": "the csrc build and csrc items"}.get(what, what)
            print(f"    {label}: {why}")


def run_preflight(timeout_s: float, env: dict) -> tuple[dict | None, str]:
    t = time.monotonic()
    rc, lines = run_with_deadline([sys.executable, str(Path(__file__).resolve()), "--preflight"], timeout_s, env,
                                  echo=False)
    for line in lines:
        if line.startswith("PREFLIGHT "):
            return json.loads(line[len("PREFLIGHT "):]), f"{time.monotonic() - t:.1f}"
    why = "timed out" if rc is None else f"exit {rc}"
    return None, f"the preflight {why}: " + " | ".join(lines[-5:])


# --- driver ------------------------------------------------------------------------------------------

def worker(deadline_epoch: float, csv_path: Path, unavailable: dict[str, str]) -> int:
    """The benchmark child: runs the items against a wall-clock deadline shared with the parent."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    os.environ.pop("TRITON_INTERPRET", None)
    failures = run_items(bench_items(csv_path), deadline_epoch, unavailable, clock=time.time,
                         out=lambda line: print(line, flush=True))
    return 1 if failures else 0


def run_with_deadline(cmd: list[str], timeout_s: float, env: dict | None,
                      echo: bool = True) -> tuple[int | None, list[str]]:
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
            if echo:
                print(f"  {line}", flush=True)
        proc.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return (None if killed else proc.returncode), lines


def remove_build_lock(build_dir: str | None) -> str | None:
    """After the build child was killed (it and its compilers are gone): its torch build lock."""
    if not build_dir:
        return None
    lock = Path(build_dir) / "lock"
    if lock.exists():
        lock.unlink(missing_ok=True)
        (Path(build_dir) / "mose_build.pid").unlink(missing_ok=True)
        return f"removed the build lock {lock} the killed build left"
    return None


def print_plan(budget_s: float, tests_s: float, run_tests: bool, run_bench: bool, csv_path: Path,
               unavailable: dict[str, str]) -> float:
    """The steps and the benchmark items in the worst case (each step at its cap, each item at its
    estimate); returns the seconds planned in all."""
    steps = [("preflight", PREFLIGHT_S), ("csrc build", 0 if "csrc" in unavailable else CSRC_BUILD_S)]
    if run_tests:
        steps.append(("tests", min(tests_s, TESTS_S)))
    steps.append(("margin (summary, teardown)", MARGIN_S))
    fixed = sum(s for _, s in steps)
    print(f"gpu-check plan (budget {budget_s:.0f} s from process start, results appended to {csv_path}):")
    for name, s in steps:
        extra = ""
        if name == "tests":
            extra = f": python {' '.join(TEST_COMMAND[1:])}"
        elif name == "csrc build":
            extra = (f": skipped ({unavailable['csrc']})" if s == 0 else f": python {' '.join(BUILD_COMMAND[1:])}")
        print(f"  {name:<27} at most {s:>4.0f} s{extra}")
    total = fixed
    if run_bench:
        items = bench_items(csv_path)
        planned, skipped = plan_items(items, budget_s - fixed, unavailable)
        bench_s = sum(i.est_s for i in planned)
        total += bench_s
        print(f"  benchmarks, in this order: {len(planned)} of {len(items)} fit the {budget_s - fixed:.0f} s left "
              f"in the worst case ({bench_s:.0f} s estimated):")
        print(f"    {'item':<72} {'per call':>9} {'calls':>6} {'+setup':>7} {'est':>6}")
        for item in items:
            why = dict((id(i), r) for i, r in skipped).get(id(item))
            mark = f"  SKIP {why}" if why else ""
            per_call = f"{item.per_call_s * 1e3:.3g} ms" if item.per_call_s < 1 else f"{item.per_call_s:.3g} s"
            print(f"    {item.name:<72} {per_call:>9} {item.calls:>6d} {item.compile_s:>6.1f}s "
                  f"{item.est_s:>5.0f}s{mark}")
        print("  (an item skipped for the budget here still runs when the steps before it finish early:\n"
              "   each item is decided against the time actually left)")
    print(f"planned: {total:.0f} s of the {budget_s:.0f} s budget")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="preflight, then print what would run and exit")
    ap.add_argument("--budget-s", type=float, default=HARD_LIMIT_S, help=f"total seconds (at most {HARD_LIMIT_S})")
    ap.add_argument("--tests-s", type=float, default=TESTS_S, help="seconds the GPU tests may take")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--csv", type=Path, default=HERE / "results.csv")
    ap.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-epoch", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--unavailable", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.preflight:
        print("PREFLIGHT " + json.dumps(preflight_report()), flush=True)
        return 0
    if args.worker:
        return worker(args.deadline_epoch, args.csv, json.loads(args.unavailable))
    started = process_start_epoch()
    budget = min(args.budget_s, HARD_LIMIT_S)
    deadline = deadline_from(started, budget)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    rep, info = run_preflight(min(PREFLIGHT_S, deadline - time.time()), env)
    if rep is None:
        print(f"gpu-check: {info}", file=sys.stderr)
        return 2
    print_preflight(rep, float(info))
    unavailable = dict(rep["unavailable"])
    if args.dry_run:
        if "cuda" in unavailable:
            print("  (no CUDA device here: the plan below is what this software stack would run on a GPU)")
        print_plan(budget, args.tests_s, not args.no_tests, not args.no_bench, args.csv,
                   {k: v for k, v in unavailable.items() if k != "cuda"})
        return 0
    if "cuda" in unavailable:
        print(f"gpu-check: {unavailable['cuda']}. It runs the GPU tests and GPU benchmarks and needs an NVIDIA GPU "
              "(H100/H200); `--dry-run` lists what it would run.", file=sys.stderr)
        return 2
    print(f"gpu-check on {', '.join(rep['gpus'])}, budget {budget:.0f} s from process start "
          f"({time.time() - started:.0f} s gone)", flush=True)

    csrc_status = "not built"
    csrc_failed = False
    if "csrc" in unavailable:
        csrc_status = f"skipped: {unavailable['csrc']}"
    else:
        print(f"[csrc build] python {' '.join(BUILD_COMMAND[1:])}", flush=True)
        rc, lines = run_with_deadline(BUILD_COMMAND, min(CSRC_BUILD_S, deadline - time.time()), env)
        if rc == 0:
            csrc_status = "built"
        else:
            if rc is None:
                why = f"the build did not finish within {CSRC_BUILD_S} s"
                removed = remove_build_lock(rep.get("csrc_build_dir"))
                if removed:
                    print(f"  {removed}", flush=True)
            else:
                why = next((l.split("unavailable: ", 1)[1] for l in reversed(lines) if "unavailable: " in l),
                           f"exit {rc}")
                csrc_failed = True        # the toolchain matches: a failed build is a failure
            csrc_status = f"{'FAILED' if csrc_failed else 'skipped'}: {why}"
            unavailable["csrc"] = why
    if "csrc" in unavailable:
        env["MOSE_CSRC"] = "0"
        env["MOSE_CSRC_REASON"] = unavailable["csrc"]

    tests_status = "not run"
    if not args.no_tests:
        print(f"[tests] python {' '.join(TEST_COMMAND[1:])}", flush=True)
        rc, lines = run_with_deadline(TEST_COMMAND, min(args.tests_s, deadline - time.time()), env)
        tests_status = "timed out" if rc is None else ("passed" if rc == 0 else f"failed (exit {rc})")
        if rc == 5:
            tests_status = "no GPU tests collected"

    bench_status, ran, skipped, failed = "not run", [], [], []
    if not args.no_bench:
        remaining = deadline - time.time()
        print(f"[benchmarks] {remaining:.0f} s left", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--deadline-epoch", str(deadline),
               "--csv", str(args.csv), "--unavailable", json.dumps({k: v for k, v in unavailable.items()})]
        rc, lines = run_with_deadline(cmd, remaining + 2, env)
        ran = [l[4:] for l in lines if l.startswith("RAN ")]
        skipped = [l[5:] for l in lines if l.startswith("SKIP ")]
        failed = [l[5:] for l in lines if l.startswith("FAIL ")]
        reported = {l.rsplit(" (", 1)[0] for l in ran} | {l.split(": ", 1)[0] for l in skipped + failed}
        unreported = [i.name for i in bench_items(args.csv) if i.name not in reported]
        skipped += [f"{name}: budget (stopped at the deadline)" for name in unreported]
        bench_status = "stopped at the deadline" if rc is None else ("finished" if rc == 0 else f"exit {rc}")

    print(f"\ngpu-check summary ({time.time() - started:.0f} s from process start):")
    print(f"  csrc: {csrc_status}")
    print(f"  tests: {tests_status}")
    print(f"  benchmarks: {bench_status}; {len(ran)} measured (rows appended to {args.csv}), "
          f"{len(skipped)} skipped, {len(failed)} failed")
    for line in skipped:
        print(f"    skipped {line}")
    for line in failed:
        print(f"    FAILED {line}")
    ok = (not csrc_failed and tests_status in ("passed", "not run") and not failed
          and bench_status in ("finished", "stopped at the deadline", "not run"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
