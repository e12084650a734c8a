"""Benchmark plumbing: the device, correct timing, and one CSV row per figure.

Every figure lands in benchmarks/results.csv with the device name, commit and date (the Liger
convention: p20/p50/p80).  CUDA timings use triton.testing.do_bench (warm-up, L2 flush,
synchronised quantiles); CPU timings use pytest-benchmark's own rounds."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).with_name("results.csv")
FIELDS = ["date", "commit", "device", "op", "variant", "shape", "dtype", "p20_ms", "p50_ms", "p80_ms",
          "tflops", "gbps", "note"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def make_row(device_label: str, timing_ms, op, variant, shape, dtype, flop=None, nbytes=None, note="") -> dict:
    """One results.csv row from (p20, p50, p80) in ms."""
    p20, p50, p80 = timing_ms
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "device": device_label,
            "op": op, "variant": variant, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "p20_ms": f"{p20:.4f}", "p50_ms": f"{p50:.4f}", "p80_ms": f"{p80:.4f}",
            "tflops": f"{flop / (p50 * 1e-3) / 1e12:.4f}" if flop else "",
            "gbps": f"{nbytes / (p50 * 1e-3) / 1e9:.2f}" if nbytes else "", "note": note}


def append_row(row: dict, path: Path = RESULTS) -> None:
    """Append one row to the CSV (header first if the file is new)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


@pytest.fixture
def record(device):
    """record(benchmark_or_quantiles, op=..., variant=..., shape=..., dtype=..., flop=..., bytes=...)"""
    def _record(timing, op, variant, shape, dtype, flop=None, nbytes=None, note=""):
        if isinstance(timing, (list, tuple)):      # do_bench quantiles in ms
            quantiles = timing
        else:                                      # pytest-benchmark fixture, seconds
            data = sorted(timing.stats.stats.data)
            q = lambda f: data[min(len(data) - 1, int(f * len(data)))] * 1e3
            quantiles = (q(0.2), q(0.5), q(0.8))
        append_row(make_row(device_name(device), quantiles, op, variant, shape, dtype, flop, nbytes, note))
    return _record


def time_cuda(fn):
    """(p20, p50, p80) in ms of fn on the GPU, synchronised, warmed up, L2 flushed."""
    from triton.testing import do_bench
    return do_bench(fn, quantiles=[0.2, 0.5, 0.8])
