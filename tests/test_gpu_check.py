"""benchmarks/gpu_check.py (`make gpu-check`), the parts that run without a GPU: the plan, the
refusal without CUDA, the budget logic, the hard kill at the deadline, and the CSV rows."""
from __future__ import annotations

import csv
import importlib.util
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


def test_dry_run_lists_the_tests_and_the_benchmarks_in_priority_order():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--budget-s", "9999"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "budget 480 s" in text                      # capped at 8 minutes
    assert "-m pytest -q -rfE -m gpu tests" in text
    lines = [l.strip() for l in text.splitlines() if l.startswith("    ")]
    assert lines[0].startswith("orth_apply triton ieee 5120x13824 bfloat16")
    for name in ("orth_apply cuda cublas 5120x13824 bfloat16", "orth_apply triton tf32x3 5120x13824 bfloat16",
                 "crosscov triton 5120x5120x64 bfloat16", "polar cupy_gesvd 4096x4096 float32",
                 "polar cupy_gesvdj 5120x5120 float32", "polar cupy_gesvdj 4096x4096 float64"):
        assert any(l.startswith(name) for l in lines), name


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
    items = [Item("a", 10, work("a", 12)), Item("big", 50, work("big", 50)), Item("b", 10, work("b", 9)),
             Item("c", 5, work("c", 1, fail=True)), Item("cupy", 1, work("cupy", 1), needs_cupy=True),
             Item("late", 30, work("late", 1))]
    lines = []
    failures = gpu_check.run_items(items, deadline=40.0, have_cupy=False, clock=lambda: now[0], out=lines.append)
    assert ran == ["a", "b", "c"] and failures == 1
    assert lines[0].startswith("RAN a")
    assert lines[1] == "SKIP big: budget: needs ~50 s, 28 s left"
    assert lines[2].startswith("RAN b") and lines[3].startswith("FAIL c: RuntimeError: broken")
    assert lines[4] == "SKIP cupy: cupy not installed"
    assert lines[5] == "SKIP late: budget: needs ~30 s, 18 s left"


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
