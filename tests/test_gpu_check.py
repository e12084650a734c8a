"""benchmarks/gpu_check.py (`make gpu-check`), the parts that run without a GPU: the plan, the
refusal without CUDA, the budget logic, the hard kill at the deadline, and the CSV rows."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load("gpu_check", SCRIPT)


def _dry_run(*extra):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *extra], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_dry_run_lists_the_tests_and_the_benchmarks_in_priority_order():
    text = _dry_run("--budget-s", "9999")
    assert "budget 480 s from process start" in text                      # capped at 8 minutes
    assert "-m pytest -q -rfEs -m gpu tests" in text
    lines = [l.strip() for l in text.splitlines() if l.startswith("    ") and not l.strip().startswith("item ")]
    lines = [l for l in lines if l.split()[0] in ("orth_apply", "crosscov", "polar")]
    assert lines[0].startswith("orth_apply triton ieee 5120x13824 bfloat16")
    for name in ("orth_apply cuda cublas 5120x13824 bfloat16", "orth_apply triton tf32x3 5120x13824 bfloat16",
                 "crosscov triton 5120x5120x64 bfloat16", "crosscov torch addmm 5120x5120x64 bfloat16",
                 "polar cupy_gesvd 4096x4096 float32", "polar cupy_gesvdj 5120x5120 float32",
                 "polar cupy_gesvdj 4096x4096 float64"):
        assert any(l.startswith(name) for l in lines), name


def test_dry_run_prints_the_preflight_and_a_plan_within_the_budget():
    """The preflight names what is missing here, with the reason; the steps at their caps plus the
    planned items at per call × calls + setup add up to at most 480 s."""
    import re
    text = _dry_run()
    assert "[preflight]" in text and "GPU:" in text and "driver:" in text and "nvcc:" in text
    assert re.search(r"torch \S+, built with CUDA", text) and "triton:" in text and "cupy:" in text
    if not torch.cuda.is_available():
        assert "cannot run here:" in text and "anything on a GPU: no CUDA device" in text
    caps = [float(m) for m in re.findall(r"^  \S.*? at most +(\d+) s", text, re.M)]
    rows = re.findall(r"^    ((?:orth_apply|crosscov|polar) .+?) +(\S+) (ms|s) +(\d+) +([\d.]+)s +(\d+)s(  SKIP .*)?$",
                      text, re.M)
    assert len(rows) == 31
    planned = 0.0
    for name, per_call, unit, calls, setup, est, skip in rows:
        seconds = float(per_call) * (1e-3 if unit == "ms" else 1.0) * int(calls) + float(setup)
        assert abs(seconds - float(est)) <= 0.5 + 0.01 * seconds, name      # est = per call × calls + setup
        assert int(calls) >= 2, name        # the accuracy call (also the warm-up), then the timed calls
        if not skip:
            planned += seconds
    total = float(re.search(r"^planned: (\d+) s of the 480 s budget", text, re.M).group(1))
    assert abs(total - (sum(caps) + planned)) <= 1.0 and total <= 480


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_refuses_without_cuda():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr


def test_budget_skips_what_no_longer_fits_and_reports_everything(gpu_check):
    Item = gpu_check.Item
    now = [0.0]
    ran = []

    def work(name, seconds, fail=False):
        def run():
            ran.append(name)
            now[0] += seconds
            if fail:
                raise RuntimeError("broken")
        return run
    # estimates are per call × calls + setup: "big" would fit at one call (10 s) but makes 5
    items = [Item("a", 2, 5, 0, work("a", 12)), Item("big", 10, 5, 0, work("big", 50)),
             Item("b", 1, 8, 2, work("b", 9)), Item("c", 1, 3, 2, work("c", 1, fail=True)),
             Item("cupy", 0.1, 3, 0, work("cupy", 1), needs=("cupy",)),
             Item("csrc", 0.1, 3, 0, work("csrc", 1), needs=("csrc",)), Item("late", 5, 6, 0, work("late", 1))]
    lines = []
    failures = gpu_check.run_items(items, deadline=40.0, unavailable={"cupy": "cupy does not import",
                                                                      "csrc": "nvcc 12.4 but torch CUDA 13.0"},
                                   clock=lambda: now[0], out=lines.append)
    assert ran == ["a", "b", "c"] and failures == 1
    assert lines[0].startswith("RAN a")
    assert lines[1] == "SKIP big: budget: needs ~50 s (10 s × 5 calls + 0 s), 28 s left"
    assert lines[2].startswith("RAN b") and lines[3].startswith("FAIL c: RuntimeError: broken")
    assert lines[4] == "SKIP cupy: cupy: cupy does not import"
    assert lines[5] == "SKIP csrc: csrc: nvcc 12.4 but torch CUDA 13.0"
    assert lines[6] == "SKIP late: budget: needs ~30 s (5 s × 6 calls + 0 s), 18 s left"


def test_deadline_counts_from_process_start(gpu_check, tmp_path):
    """The budget runs from when the process started, not from when the script got to it: a child
    that spends 2 s before importing the script still has its deadline 480 − 10 s after its start."""
    assert gpu_check.deadline_from(1000.0, 480) == 1470.0
    assert gpu_check.deadline_from(1000.0, 9999) == 1470.0          # capped at 8 minutes
    assert gpu_check.deadline_from(1000.0, 300, margin_s=5) == 1295.0
    code = ("import time, sys, importlib.util; t0 = time.time(); time.sleep(2.0); "
            f"spec = importlib.util.spec_from_file_location('g', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); "
            "sys.modules['g'] = m; spec.loader.exec_module(m); "
            "print(t0, m.process_start_epoch(), m._IMPORTED_AT)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    t0, start, imported = map(float, out.stdout.split())
    assert imported - t0 >= 2.0                     # the script itself starts late ...
    assert start <= t0 and t0 - start < 10.0        # ... its budget does not


def test_calls_per_item_are_counted_honestly(gpu_check):
    # a fast call: accuracy + probe + do_bench (1 + 5 estimate, 25 ms warm-up, 100 ms of repetitions)
    assert gpu_check.planned_calls(0.010) == 2 + 6 + 2 + 10
    assert gpu_check.planned_calls(0.001) == 2 + 6 + 25 + 100
    # a slow call: accuracy + probe + as many repeats as fit 8 s, at most 4
    assert gpu_check.planned_calls(1.0) == 2 + 4
    assert gpu_check.planned_calls(3.0) == 2 + 2
    assert gpu_check.planned_calls(20.0) == 2
    item = gpu_check.Item("x", per_call_s=2.0, calls=6, compile_s=5.0)
    assert item.est_s == 17.0
    assert gpu_check.decide(item, 16.9, {}) .startswith("budget")
    assert gpu_check.decide(item, 17.1, {}) is None


def test_floors_per_precision_at_the_datasheet_peak(gpu_check):
    flop = 2.0 * 5120 * 5120 * 13824                   # W ← R·W at LLaMA-2-13B down_proj
    ms, why = gpu_check.floor_ms("NVIDIA H200", "bf16", flop)
    assert abs(ms - flop / 989e12 * 1e3) < 1e-9 and abs(ms - 0.7329) < 1e-3 and "bf16" in why
    assert abs(gpu_check.floor_ms("NVIDIA H100 80GB HBM3", "fp32", flop)[0] - 10.82) < 0.01    # IEEE fp32 FMA
    assert abs(gpu_check.floor_ms("NVIDIA H200", "3xtf32", flop)[0] - 3 * flop / 495e12 * 1e3) < 1e-9
    # the cross-covariance reads and writes d² float32 entries: memory-bound, at each GPU's HBM
    d, k = 5120, 64
    nbytes = 2 * d * d * 4 + 2 * d * k * 2
    h100 = gpu_check.floor_ms("NVIDIA H100 80GB HBM3", "bf16", 2.0 * d * d * k, nbytes)
    h200 = gpu_check.floor_ms("NVIDIA H200", "bf16", 2.0 * d * d * k, nbytes)
    assert abs(h100[0] - nbytes / 3.35e12 * 1e3) < 1e-9 and "3.35 TB/s" in h100[1]
    assert abs(h200[0] - nbytes / 4.8e12 * 1e3) < 1e-9
    assert gpu_check.floor_ms("NVIDIA H100 PCIe", "bf16", flop)[0] > ms
    assert gpu_check.floor_ms("Some GPU", "bf16", flop) is None
    for v in gpu_check.APPLY_VARIANTS:                  # every variant states its own precision
        assert gpu_check.APPLY_PRECISION[v] in gpu_check.PRECISIONS
    assert gpu_check.APPLY_PRECISION["triton ieee"] == "fp32" and gpu_check.APPLY_PRECISION["triton tf32x3"] == "3xtf32"


def test_addmm_baseline_is_one_real_addmm_on_prepared_float32(gpu_check, monkeypatch):
    from mose_fast.kernels.crosscov import crosscov_reference
    B, A = torch.randn(33, 8).to(torch.bfloat16), torch.randn(33, 8).to(torch.bfloat16)
    P = torch.randn(33, 33)
    fn = gpu_check.crosscov_fn("torch addmm", B, A, P, 100.0)
    calls = []
    real = torch.addmm

    def addmm(*a, **k):
        calls.append((a, k))
        return real(*a, **k)
    monkeypatch.setattr(torch, "addmm", addmm)
    M = fn()
    assert len(calls) == 1
    (P_, B_, At_), kw = calls[0]
    assert all(t.dtype == torch.float32 for t in (P_, B_, At_)) and kw == {"beta": 100.0, "alpha": 1.0}
    assert At_.shape == (8, 33)
    assert float((M.double() - crosscov_reference(B, A, P, 1.0, 100.0)).abs().max()) < 1e-3


def test_preflight_names_what_cannot_run_and_why(gpu_check, monkeypatch):
    """Stand-ins for a GPU machine: triton missing, CuPy importing but its SVD failing, an nvcc of
    another CUDA major version than torch's — each becomes a skip reason."""
    from mose_fast import backends, cuda_ext
    monkeypatch.setenv("TRITON_INTERPRET", "1")      # preflight_report drops it; restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setitem(sys.modules, "triton", None)                 # import triton raises ImportError
    monkeypatch.setattr(backends, "cupy_status", lambda device_index=None: (
        False, "cupy 13.6.0 imports but its cuSOLVER SVD fails on cuda:0 (CUSOLVER_STATUS_NOT_INITIALIZED)"))
    monkeypatch.setattr(cuda_ext, "nvcc_version", lambda path=None: ((12, 4), "nvcc 12.4 (/usr/local/cuda/bin/nvcc)"))
    monkeypatch.setattr(gpu_check, "_driver_version", lambda: "570.86")
    rep = gpu_check.preflight_report()
    un = rep["unavailable"]
    assert rep["gpus"] == ["NVIDIA H200"] and rep["driver"] == "570.86" and rep["torch_cuda"] == "13.0"
    assert "cuda" not in un and un["triton"].startswith("triton does not import")
    assert "cuSOLVER SVD fails" in un["cupy"]
    assert "nvcc 12.4" in un["csrc"] and "CUDA 13.0" in un["csrc"] and "13.x" in un["csrc"]
    assert "gpu-cuda13" in rep["install_hint"]
    # the benchmark items that need them are skipped with these reasons
    items = gpu_check.bench_items(Path("unused.csv"))
    reasons = {i.name: gpu_check.decide(i, 1e9, un) for i in items}
    assert reasons["orth_apply triton ieee 5120x13824 bfloat16"] == f"triton: {un['triton']}"
    assert reasons["orth_apply cuda tiled 5120x13824 bfloat16"] == f"csrc: {un['csrc']}"
    assert reasons["polar cupy_gesvdj 4096x4096 float32"] == f"cupy: {un['cupy']}"
    assert reasons["orth_apply torch panels fp32 5120x13824 bfloat16"] is None


def test_deadline_kills_the_child_and_its_children(gpu_check):
    """The hard limit holds even when a child hangs in something that ignores the budget (a
    compiler, a solve): its whole process group is killed at the timeout."""
    code = ("import subprocess, sys, time; print('started', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    t = time.monotonic()
    rc, lines = gpu_check.run_with_deadline([sys.executable, "-c", code], 2.0, env=None)
    assert rc is None and lines == ["started"]
    assert time.monotonic() - t < 10
    rc, lines = gpu_check.run_with_deadline([sys.executable, "-c", "print('done')"], 30.0, env=None)
    assert rc == 0 and lines == ["done"]


def test_rows_have_the_results_csv_format(tmp_path):
    bench = load("bench_conftest", ROOT / "benchmarks" / "conftest.py")
    path = tmp_path / "results.csv"
    row = bench.make_row("NVIDIA H200", (1.0, 2.0, 4.0), "orth_apply", "triton ieee", "5120x13824",
                         torch.bfloat16, flop=7.25e11, nbytes=3.35e8, note="gpu-check")
    bench.append_row(row, path)
    bench.append_row(row, path)
    with path.open() as f:
        rows = list(csv.reader(f))
    with (ROOT / "benchmarks" / "results.csv").open() as f:
        assert rows[0] == next(csv.reader(f)) == bench.FIELDS
    assert len(rows) == 3
    got = dict(zip(rows[0], rows[1]))
    assert got["dtype"] == "bfloat16" and got["p50_ms"] == "2.0000" and got["tflops"] == "362.5000"
    assert got["gbps"] == "167.50" and got["note"] == "gpu-check"


def test_make_target():
    out = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "benchmarks/gpu_check.py" in out.stdout


def test_orchestration_on_a_gpu_machine_with_a_build_that_times_out(gpu_check, monkeypatch, tmp_path, capsys):
    """Stand-ins for the children: the csrc build is killed at its timeout (its lock is removed, the
    tests and benchmarks run with MOSE_CSRC=0 and the reason), the tests pass, one benchmark runs."""
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    rep = {"gpus": ["NVIDIA H200"], "driver": "570.86", "torch": "2.13.0", "torch_cuda": "13.0", "triton": "3.9.0",
           "cupy": "cupy 14.2.0: cuSOLVER SVD runs on cuda:0", "nvcc": "nvcc 13.0", "csrc": "matches",
           "csrc_build_dir": str(build_dir), "install_hint": "pip install -e '.[gpu-cuda13]'", "unavailable": {}}
    monkeypatch.setattr(gpu_check, "run_preflight", lambda timeout_s, env: (rep, "3.0"))
    seen = []

    def run(cmd, timeout_s, env, echo=True):
        seen.append((cmd, timeout_s, dict(env or {})))
        if "mose_fast.cuda_ext" in cmd:
            return None, ["csrc toolchain: nvcc 13.0 matches"]
        if "pytest" in cmd:
            return 0, ["1 passed, 3 skipped"]
        return 0, ["RAN orth_apply triton ieee 5120x13824 bfloat16 (4.0 s)"] + [
            f"SKIP {i.name}: budget" for i in gpu_check.bench_items(tmp_path / "r.csv")[1:]]
    monkeypatch.setattr(gpu_check, "run_with_deadline", run)
    rc = gpu_check.main(["--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert rc == 0
    assert not (build_dir / "lock").exists() and "removed the build lock" in out
    build, tests, bench = seen
    assert build[1] <= gpu_check.CSRC_BUILD_S
    assert tests[2]["MOSE_CSRC"] == "0" and "did not finish within" in tests[2]["MOSE_CSRC_REASON"]
    assert "csrc" in json.loads(bench[0][bench[0].index("--unavailable") + 1])
    deadline = float(bench[0][bench[0].index("--deadline-epoch") + 1])
    assert deadline <= gpu_check.process_start_epoch() + 480 - gpu_check.MARGIN_S + 1e-6
    assert "csrc: skipped: the build did not finish within" in out and "tests: passed" in out
