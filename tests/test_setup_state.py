"""``make setup`` is skipped only while this environment's record matches setup.py and the Makefile and
the packages are installed from this checkout."""
import shutil
from pathlib import Path

import pytest

from mose_fast import setup_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("setup.py", "Makefile"):
        shutil.copy(REPO / name, root / name)
    prefix = tmp_path / "venv"
    prefix.mkdir()
    monkeypatch.setattr(setup_state, "ROOT", root)
    monkeypatch.setattr(setup_state.sys, "prefix", str(prefix))
    return root


def test_setup_is_current_only_after_it_was_recorded_and_until_setup_py_changes(checkout, monkeypatch):
    monkeypatch.setattr(setup_state, "installed", lambda: True)
    assert setup_state.main([]) == 1                      # nothing recorded in this environment
    assert setup_state.main(["--write"]) == 0
    assert setup_state.main([]) == 0
    (checkout / "setup.py").write_text((checkout / "setup.py").read_text() + "\n# a new dependency\n")
    assert setup_state.main([]) == 1
    setup_state.main(["--write"])
    monkeypatch.setattr(setup_state, "installed", lambda: False)   # e.g. the venv was rebuilt
    assert setup_state.main([]) == 1


def test_a_mose_fast_installed_from_another_checkout_is_not_ours(checkout):
    # the installed package lives in the real repository, not in this copy of setup.py and Makefile
    assert setup_state.installed() is False
