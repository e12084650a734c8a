"""The repository passes `ruff check` (rules and exclusions in ruff.toml): unused imports and names,
undefined names, import order and line length are caught here rather than in review."""
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str]:
    try:
        from ruff.__main__ import find_ruff_bin
        return [find_ruff_bin()]
    except ImportError:
        exe = shutil.which("ruff")
        if exe is None:
            raise AssertionError("ruff is not installed: pip install -e '.[test]'") from None
        return [exe]


def test_ruff_check_passes():
    done = subprocess.run([*ruff_command(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, ("ruff check found problems (`ruff check --fix .` fixes some):\n"
                                  + done.stdout + done.stderr)


def test_ruff_check_fails_on_an_unused_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    done = subprocess.run([*ruff_command(), "check", "--no-cache", "--config", str(ROOT / "ruff.toml"), str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "F401" in done.stdout, done.stdout + done.stderr
