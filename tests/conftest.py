"""What every test session needs: no hub, no write to the user's cache, Triton's interpreter where
there is no GPU; and the shared fixtures.  The shared helpers (tiny models, configs, synthetic
problems) are in ``helpers.py``."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The suite never writes the user's cache: every test (and every subprocess it starts) sees
# MOSE_CACHE_DIR set to a temporary folder of this session, and the session fails if the user's
# folder (MOSE_CACHE_DIR as it was, else ~/.cache/mose_fast) changed while it ran.
def cache_listing(path: Path) -> dict[str, tuple[int, int]] | None:
    """{relative path: (size, mtime in ns)} of every file under ``path`` (None: no such folder)."""
    if not path.is_dir():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


USER_CACHE = Path(os.environ.get("MOSE_CACHE_DIR") or Path.home() / ".cache" / "mose_fast")
USER_CACHE_BEFORE = cache_listing(USER_CACHE)
TEST_CACHE = Path(tempfile.mkdtemp(prefix="mose_fast_test_cache_"))
os.environ["MOSE_CACHE_DIR"] = str(TEST_CACHE)


def pytest_sessionfinish(session, exitstatus):
    after = cache_listing(USER_CACHE)
    if after != USER_CACHE_BEFORE:
        changed = sorted(set(after or {}) ^ set(USER_CACHE_BEFORE or {})
                         | {k for k in (after or {})
                            if k in (USER_CACHE_BEFORE or {}) and after[k] != USER_CACHE_BEFORE[k]})
        session.config.get_terminal_writer().line(
            f"ERROR: the test suite changed the user's cache {USER_CACHE}: {changed[:10]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(TEST_CACHE, ignore_errors=True)
# Triton kernels run in the interpreter on machines without CUDA (decided before triton loads).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import make_tiny_model  # noqa: E402  (after the environment above is set)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled memory, to expose reads of unwritten output."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
