"""C0 = E[k kᵀ] against a float64 reference built from full forward passes; the disk cache."""
import pytest
import torch

from mose_fast.hf.arch import resolve_arch
from mose_fast.hf.hooks import capture_inputs
from mose_fast.memit import stats

from helpers import CORPUS, make_tiny_model


def reference_c0(model, tok, arch, layer, n_tokens, seq_len):
    """Independent reference: full forward (no early stop) on the same windows, keys in float64."""
    windows = stats._token_windows(tok, stats.read_corpus(CORPUS), n_tokens, seq_len)
    keys = []
    for w in windows:
        with capture_inputs({"k": arch.mlp_out_module(model, layer)}) as seen, torch.no_grad():
            model(input_ids=torch.tensor([w]))
        keys.append(seen["k"][0][0].double())
    K = torch.cat(keys)[:n_tokens]
    return K.T @ K / K.shape[0]


@pytest.mark.model
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_second_moment_matches_reference(family):
    model, tok = make_tiny_model(family)
    arch = resolve_arch(model)
    got, count = stats.compute_second_moments(model, tok, arch, [0, 2], CORPUS, n_tokens=150, seq_len=32,
                                              batch_size=3, progress=False)
    assert count == 150
    for layer in (0, 2):
        assert got[layer].dtype == torch.float64
        torch.testing.assert_close(got[layer], reference_c0(model, tok, arch, layer, 150, 32), rtol=1e-5, atol=1e-7)


@pytest.mark.model
def test_cache_hit_miss_and_mismatch(tmp_path, monkeypatch):
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    kw = dict(n_tokens=100, seq_len=32, batch_size=4, cache_dir=tmp_path, progress=False)
    first = stats.key_second_moments(model, tok, arch, [1], CORPUS, **kw)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    calls = []
    real = stats.compute_second_moments

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(stats, "compute_second_moments", counting)
    again = stats.key_second_moments(model, tok, arch, [1], CORPUS, **kw)
    assert not calls and torch.equal(first[1], again[1])          # hit: reused

    stats.key_second_moments(model, tok, arch, [1], CORPUS[:-1] + ["another text"], **kw)
    assert len(calls) == 1                                         # other corpus: recomputed
    stats.key_second_moments(model, tok, arch, [1], CORPUS, **{**kw, "n_tokens": 120})
    assert len(calls) == 2                                         # other token count: recomputed

    with torch.no_grad():                                          # other weights: recomputed
        arch.weight_view(model, 0).mul_(1.01)
    stats.key_second_moments(model, tok, arch, [1], CORPUS, **kw)
    assert len(calls) == 3


@pytest.mark.model
def test_tampered_cache_is_recomputed(tmp_path):
    from safetensors.torch import load_file, save_file
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    kw = dict(n_tokens=100, seq_len=32, batch_size=4, cache_dir=tmp_path, progress=False)
    good = stats.key_second_moments(model, tok, arch, [1], CORPUS, **kw)[1]
    path = next(tmp_path.glob("*.safetensors"))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta["n_tokens"] = "999"        # a file whose key does not match its name
    save_file({"C0": load_file(str(path))["C0"] * 2}, str(path), metadata=meta)
    again = stats.key_second_moments(model, tok, arch, [1], CORPUS, **kw)[1]
    torch.testing.assert_close(again, good)


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        stats.read_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty"):
        stats.read_corpus(["", "  "])
    with pytest.raises(ValueError, match="expected str"):
        stats.read_corpus(["ok", 3])
    p = tmp_path / "w.txt"
    p.write_text(" = Heading = \n\n Some text here . \n")
    assert stats.read_corpus(p) == ["Some text here ."]


@pytest.mark.model
def test_tokens_used_by_a_short_corpus_are_reported_computed_and_cached(tmp_path):
    """A corpus shorter than n_tokens: C0 and the count behind it are what the corpus has, whether
    computed or read back from the cache."""
    model, tok = make_tiny_model("llama")
    arch = resolve_arch(model)
    have = sum(len(w) for w in stats._token_windows(tok, stats.read_corpus(CORPUS), 10**6, 32))
    kw = dict(n_tokens=10**6, seq_len=32, batch_size=4, cache_dir=tmp_path, progress=False)
    used, again = {}, {}
    stats.key_second_moments(model, tok, arch, [1, 2], CORPUS, used=used, **kw)
    stats.key_second_moments(model, tok, arch, [1, 2], CORPUS, used=again, **kw)
    assert 0 < have < 10**6 and used == again == {1: have, 2: have}
