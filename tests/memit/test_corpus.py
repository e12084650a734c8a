"""Where the statistics corpus comes from: the configured file, WikiText-2 in the data folder, or text
the model writes itself (generated once per model and seed, then read from the cache)."""
from pathlib import Path

import pytest
import torch

from mose_fast.memit import stats

from helpers import make_tiny_model


def test_default_data_dir_is_shared_data_beside_the_checkout(monkeypatch):
    monkeypatch.delenv("MOSE_DATA_DIR", raising=False)
    checkout = Path(stats.__file__).resolve().parents[2]
    assert (checkout / "setup.py").is_file()
    assert stats.default_data_dir() == checkout.parent / "shared" / "data"
    monkeypatch.setenv("MOSE_DATA_DIR", "/elsewhere")
    assert stats.default_data_dir() == Path("/elsewhere")


@pytest.mark.model
def test_corpus_resolution_order(tmp_path):
    model, tok = make_tiny_model("llama")
    mine = tmp_path / "mine.txt"
    mine.write_text("some text\n")
    data = tmp_path / "data"
    (data / "wikitext-2").mkdir(parents=True)
    assert stats.statistics_corpus(str(mine), data, model, tok, 0, 100) == str(mine)
    (data / "wikitext-2" / "valid.txt").write_text("wiki text\n")
    assert stats.statistics_corpus(None, data, model, tok, 0, 100) == str(data / "wikitext-2" / "valid.txt")
    texts = stats.statistics_corpus(None, tmp_path / "nothing-here", model, tok, 0, 100,
                                    cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(texts, list) and texts and all(isinstance(t, str) and t for t in texts)


@pytest.mark.model
def test_generated_corpus_is_reproducible_cached_and_large_enough(tmp_path, monkeypatch):
    model, tok = make_tiny_model("llama")
    first = stats.generated_corpus(model, tok, 300, seed=3, length=8, cache_dir=tmp_path, progress=False)
    n_tokens = sum(len(tok(t)["input_ids"]) for t in first)
    assert n_tokens >= 150           # about n_tokens of text (openings count, as in the stats windows)
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert stats.generated_corpus(model, tok, 300, seed=3, length=8, cache_dir=tmp_path, progress=False) == first
    assert not calls                                               # read from the cache
    other = stats.generated_corpus(model, tok, 300, seed=4, length=8, cache_dir=tmp_path, progress=False)
    assert calls and other != first                                 # another seed, other text
    # and it feeds the statistics like any corpus
    got, count = stats.compute_second_moments(model, tok, __import__("mose_fast").hf.arch.resolve_arch(model), [1],
                                              first, n_tokens=100, seq_len=16, batch_size=2, progress=False)
    assert count == 100 and torch.isfinite(got[1]).all()


@pytest.mark.model
def test_generated_corpus_runs_one_batched_generate_per_round_and_fewer_tokens_are_a_prefix(tmp_path, monkeypatch):
    model, tok = make_tiny_model("llama")
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(k["input_ids"].shape[0]) or real(*a, **k))
    small = stats.generated_corpus(model, tok, 200, seed=5, length=6, rows=16, cache_dir=tmp_path / "a", progress=False)
    rounds_small = len(calls)
    assert set(calls) == {16}                                    # every opening row in one call per round
    large = stats.generated_corpus(model, tok, 900, seed=5, length=6, rows=16, cache_dir=tmp_path / "b", progress=False)
    assert len(calls) - rounds_small > rounds_small              # more rounds for more tokens ...
    assert large[:len(small)] == small                           # ... and the first rounds are the same text


@pytest.mark.model
def test_the_generated_fallback_corpus_holds_generated_tokens(tmp_path, monkeypatch):
    """Without a corpus file or WikiText-2, the statistics come from GENERATED_TOKENS generated tokens
    (fewer when fewer are asked for)."""
    model, tok = make_tiny_model("llama")
    asked = []
    monkeypatch.setattr(stats, "generated_corpus", lambda m, t, n, *a, **k: asked.append(n) or ["text"])
    stats.statistics_corpus(None, tmp_path / "nothing-here", model, tok, 0, 100_000)
    stats.statistics_corpus(None, tmp_path / "nothing-here", model, tok, 0, 500)
    assert asked == [stats.GENERATED_TOKENS, 500]
