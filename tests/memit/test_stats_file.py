"""Statistics files (``mose-fast stats --out FILE``, ``--stats FILE``): written once, used by an editor
exactly as computed statistics are, and refused — naming the file and the field — for another
model, another tokenizer or missing layers, before any weight is loaded."""
import json

import pytest
import torch

from mose_fast import EditRequest, MOSEConfig, MOSEEditor, cli
from mose_fast.memit.stats import _token_windows, read_corpus
from mose_fast.memit.stats_file import check_statistics, load_statistics, read_header, save_statistics

from helpers import CORPUS, make_tiny_model, tiny_mose_config, tiny_second_moments

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")


@pytest.fixture(scope="module")
def llama_stats(tmp_path_factory):
    model, tok = make_tiny_model("llama")
    C0 = tiny_second_moments(model, tok, [1, 2])
    path = save_statistics(tmp_path_factory.mktemp("stats") / "tiny.safetensors", C0, model.config, tok,
                           "tiny corpus", 400)
    return path, C0


@pytest.mark.model
def test_a_statistics_file_edits_exactly_as_the_statistics_it_holds(llama_stats):
    path, C0 = llama_stats
    meta, shapes = read_header(path)
    assert shapes == {"C0.1": (64, 64), "C0.2": (64, 64)} and meta["corpus"] == "tiny corpus"
    results = []
    for kw in ({"second_moments": C0}, {"statistics_file": path}):
        model, tok = make_tiny_model("llama")
        editor = MOSEEditor(model, tok, tiny_mose_config(), progress=False, **kw)
        editor.edit(REQ)
        results.append({l: editor.weight(l).clone() for l in editor.cfg.layers})
        if "statistics_file" in kw:
            assert editor.statistics_corpus_name == f"statistics file {path}"
    for l in results[0]:
        assert torch.equal(results[0][l], results[1][l])
    loaded = load_statistics(path, model.config, tok, [2])
    assert set(loaded) == {2} and loaded[2].dtype == torch.float64 and torch.equal(loaded[2], C0[2].double())


@pytest.mark.model
def test_a_statistics_file_of_another_model_is_refused_naming_the_field(llama_stats, tmp_path):
    path, _ = llama_stats
    llama, tok = make_tiny_model("llama")
    gpt2, gtok = make_tiny_model("gpt2")
    with pytest.raises(ValueError, match=f"{path}.*model_type differs"):
        check_statistics(path, gpt2.config, gtok, [1, 2])
    wider = type(llama.config).from_dict({**llama.config.to_dict(), "intermediate_size": 96})
    with pytest.raises(ValueError, match=r"C0.1 is \(64, 64\).*width 96"):
        check_statistics(path, wider, tok, [1, 2])
    deeper = type(llama.config).from_dict({**llama.config.to_dict(), "num_hidden_layers": 6})
    with pytest.raises(ValueError, match="num_layers differs"):
        check_statistics(path, deeper, tok, [1, 2])
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<eos>")
    tok2.add_tokens(["Darrieux"])
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_statistics(path, llama.config, tok2, [1, 2])
    with pytest.raises(ValueError, match=r"layers \[1, 2\] held, the edit needs \[3\]"):
        check_statistics(path, llama.config, tok, [1, 3])
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a file of statistics")
    with pytest.raises(ValueError, match="not a safetensors file"):
        check_statistics(bad, llama.config, tok, [1])
    with pytest.raises(FileNotFoundError, match="not found"):
        check_statistics(tmp_path / "missing.safetensors", llama.config, tok, [1])


@pytest.mark.model
def test_cli_refuses_a_statistics_file_of_another_model_before_loading_it(llama_stats, tmp_path, capsys, monkeypatch):
    import mose_fast.hf.models as models
    path, _ = llama_stats
    model, tok = make_tiny_model("gpt2")
    d = tmp_path / "tiny-gpt2"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    requests = tmp_path / "edits.json"
    requests.write_text(json.dumps([{"prompt": "The mother tongue of Danielle Darrieux is",
                                     "subject": "Danielle Darrieux",
                                     "target_new": "English", "ground_truth": "French"}]))

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the statistics file was checked")
    monkeypatch.setattr(models, "load_model", refuse)
    rc = cli.main(["edit", "--model", str(d), "--layers", "1-2", "--requests", str(requests), "--stats", str(path),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and "model_type differs" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_stats_command_writes_a_file_the_edit_command_uses(tmp_path, capsys):
    model, tok = make_tiny_model("llama")
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    stats = tmp_path / "stats.safetensors"
    common = ["--model", str(d), "--layers", "1-2", "--stats-corpus", str(corpus), "--stats-tokens", "400"]
    assert cli.main(["stats", *common, "--out", str(stats)]) == 0
    assert f"--stats {stats}" in capsys.readouterr().out
    meta, shapes = read_header(stats)
    assert set(shapes) == {"C0.1", "C0.2"} and meta["n_tokens"] == "400" and str(corpus) in meta["corpus"]
    # a corpus shorter than --stats-tokens: the file records the tokens C0 was computed over
    short = tmp_path / "short.safetensors"
    assert cli.main(["stats", *common[:-1], "100000", "--out", str(short)]) == 0
    have = sum(len(w) for w in _token_windows(tok, read_corpus(str(corpus)), 100000,
                                              MOSEConfig.preset('mose', 'llama').stats_seq_len))
    assert read_header(short)[0]["n_tokens"] == str(have) and have < 100000
    assert f"C0 over {have} tokens" in capsys.readouterr().out
    requests = tmp_path / "edits.json"
    requests.write_text(json.dumps([{"prompt": "The mother tongue of Danielle Darrieux is",
                                     "subject": "Danielle Darrieux",
                                     "target_new": "English", "ground_truth": "French"}]))
    assert cli.main(["edit", "--model", str(d), "--layers", "1-2", "--requests", str(requests), "--stats", str(stats),
                     "--out", str(tmp_path / "edited")]) == 0
    assert (tmp_path / "edited" / "config.json").is_file()
