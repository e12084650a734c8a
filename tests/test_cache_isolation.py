"""The test suite runs with a temporary cache: nothing it computes lands in the user's MOSE_CACHE_DIR
(tests/conftest.py fails the session if that folder changed)."""
import os
from pathlib import Path

from mose_fast.memit.stats import default_cache_dir

import conftest


def test_the_suite_caches_in_a_temporary_folder_not_the_users():
    assert Path(os.environ["MOSE_CACHE_DIR"]) == conftest.TEST_CACHE == default_cache_dir()
    assert conftest.TEST_CACHE != conftest.USER_CACHE
    assert conftest.TEST_CACHE.is_dir()


def test_a_change_to_the_cache_is_seen(tmp_path):
    """The listing the session compares before and after sees a new file and a rewritten one."""
    (tmp_path / "a.safetensors").write_bytes(b"12")
    before = conftest.cache_listing(tmp_path)
    assert conftest.cache_listing(tmp_path) == before
    (tmp_path / "b.json").write_text("{}")
    assert conftest.cache_listing(tmp_path) != before
    before = conftest.cache_listing(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"1234")
    assert conftest.cache_listing(tmp_path) != before
    assert conftest.cache_listing(tmp_path / "missing") is None
