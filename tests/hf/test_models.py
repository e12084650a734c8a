"""Loading and saving: a model loaded from GGUF saves as a plain safetensors model that
``from_pretrained`` loads, with the edit in it; the embedded default does the same (slow)."""
import json

import pytest
import torch
from gguf_writer import write_tiny_llama_gguf

from mose_fast import EditRequest, MOSEConfig, MOSEEditor
from mose_fast.hf import models
from mose_fast.hf.models import check_savable, load_model, model_config, save_model
from mose_fast.hf.scoring import answer_nll, landed

from helpers import make_tiny_model, tiny_mose_config, tiny_second_moments

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")


@pytest.fixture
def tiny_gguf(tmp_path):
    model, tok = make_tiny_model("llama")
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(model, tok, path)
    return path, model


def _edit(model, tok):
    cfg = tiny_mose_config(lam=0.1, v_num_grad_steps=20, land_retries=3, land_boost=10.0)
    editor = MOSEEditor(model, tok, cfg, second_moments=tiny_second_moments(model, tok, cfg.layers), progress=False)
    editor.edit(REQ)
    return editor


@pytest.mark.model
def test_gguf_file_loads_the_model_it_was_written_from(tiny_gguf):
    path, original = tiny_gguf
    model, _ = load_model(path)
    for k, v in original.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert model_config(path).num_hidden_layers == original.config.num_hidden_layers


@pytest.mark.model
def test_a_gguf_file_is_converted_once_and_later_loads_read_the_copy(tiny_gguf, tmp_path, monkeypatch):
    """The first load caches a float32 copy; the next reads it without touching the GGUF reader and
    gets the same weights, token ids and fingerprints (so the statistics cache still hits); a changed
    GGUF file is converted again."""
    import os

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from mose_fast.hf.models import _source, converted_dir
    from mose_fast.memit.stats import model_fingerprint
    from mose_fast.memit.stats_file import tokenizer_fingerprint
    path, original = tiny_gguf
    monkeypatch.setenv("MOSE_CACHE_DIR", str(tmp_path / "cache"))
    first, tok1 = load_model(path)
    assert (converted_dir(path) / "config.json").is_file() and _source(path)[0] == str(converted_dir(path))

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF file was read again")
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    second, tok2 = load_model(path)
    for k, v in original.state_dict().items():
        assert torch.equal(second.state_dict()[k], v), k
    text = "The mother tongue of Danielle Darrieux is French"
    assert tok2(text)["input_ids"] == tok1(text)["input_ids"] and tok2.pad_token_id == tok1.pad_token_id
    assert model_fingerprint(second) == model_fingerprint(first)
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok1)
    assert model_config(path).num_hidden_layers == original.config.num_hidden_layers
    assert load_model(path, dtype="bfloat16")[0].model.embed_tokens.weight.dtype == torch.bfloat16

    monkeypatch.undo()
    monkeypatch.setenv("MOSE_CACHE_DIR", str(tmp_path / "cache"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))      # the file changed: its copy is stale
    assert _source(path)[2] == path
    load_model(path)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


@pytest.mark.model
def test_a_cache_folder_that_cannot_be_written_only_costs_speed(tiny_gguf, tmp_path, monkeypatch):
    path, original = tiny_gguf
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MOSE_CACHE_DIR", str(blocked))
    model, _ = load_model(path)
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert blocked.read_text() == "a file where the cache folder would be"


@pytest.mark.model
@pytest.mark.parametrize("save_dtype", [None, "bfloat16"])
def test_gguf_loaded_model_saves_edited_and_reloads_with_from_pretrained(tiny_gguf, tmp_path, save_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, _ = tiny_gguf
    model, tok = load_model(path)
    assert landed(model, tok, [REQ]) == [0.0]
    editor = _edit(model, tok)
    assert landed(model, tok, [REQ]) == [1.0]
    out = editor.save(tmp_path / "edited", dtype=save_dtype)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    want = torch.bfloat16 if save_dtype else torch.float32
    for k, v in model.state_dict().items():
        got = reloaded.state_dict()[k]
        assert got.dtype == want, k
        assert torch.equal(got, v.to(want)), k
    if save_dtype is None:    # the reloaded model answers with the new object, as the edited one does
        assert landed(reloaded, tok2, [REQ]) == [1.0]
        assert answer_nll(reloaded, tok2, [REQ.text], ["English"]) == answer_nll(model, tok, [REQ.text], ["English"])
    journal = json.loads((out / "mose_journal.json").read_text())
    assert [e["op"] for e in journal["entries"]] == ["edit"]
    # the in-memory model keeps its GGUF bookkeeping after the save
    assert getattr(model, "hf_quantizer", None) is not None


@pytest.mark.model
def test_save_refuses_a_folder_holding_something_else_before_writing(tmp_path):
    model, tok = make_tiny_model("llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        check_savable(model, busy)
    with pytest.raises(ValueError, match="not empty"):
        save_model(model, tok, busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_embedded_default_edits_saves_and_reloads(tmp_path):
    """The embedded SmolLM2 (GGUF) with the default preset: one edit, saved, reloaded with
    from_pretrained, answering with the new object."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = load_model()
    req = EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", target_true="Paris")
    assert landed(model, tok, [req]) == [0.0]
    cfg = MOSEConfig.preset("mose", "llama", stats_tokens=20_000)
    editor = MOSEEditor(model, tok, cfg, progress=False)
    editor.edit(req)
    out = editor.save(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    assert landed(reloaded, tok2, [req]) == [1.0]
    for l in cfg.layers:
        name = f"model.layers.{l}.mlp.down_proj.weight"
        assert torch.equal(reloaded.state_dict()[name], model.state_dict()[name])


class _StubModel:
    """What load_model does to the model it gets: eval, requires_grad_, to, config."""
    def __init__(self):
        self.moved_to, self.config = [], type("Config", (), {})()

    def to(self, device=None, dtype=None):
        self.moved_to.append(str(device))
        self.cast_to = dtype
        return self

    def eval(self):
        return self

    def requires_grad_(self, flag):
        return self


@pytest.mark.parametrize("device, gguf, want_map, want_moves", [
    ("cuda:1", False, {"": torch.device("cuda", 1)}, []),       # straight onto the GPU from the files
    ("cuda", False, {"": torch.device("cuda")}, []),
    (None, False, None, ["cpu"]),                               # CPU: as before
    ("cpu", False, None, ["cpu"]),
    ("cuda:0", True, None, ["cuda:0"]),                         # GGUF: dequantised on the host anyway
])
def test_load_model_places_weights_on_the_device_while_loading(tmp_path, monkeypatch, device, gguf, want_map,
                                                                want_moves):
    from transformers import AutoModelForCausalLM
    _, tok = make_tiny_model("llama")
    (tmp_path / "config.json").write_text("{}")
    path = tmp_path / "m.gguf" if gguf else tmp_path
    if gguf:
        path.write_bytes(b"")
    calls, stub = [], _StubModel()

    def from_pretrained(src, **kw):
        calls.append(kw)
        return stub
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    cached = []
    monkeypatch.setattr(models, "_cache_converted", lambda m, t, g: cached.append(g))
    model, _ = load_model(path, dtype="bfloat16", device=device, tokenizer=tok)
    assert model is stub and len(calls) == 1
    assert calls[0].get("device_map") == want_map
    # GGUF: dequantised in float32 (what its cached copy holds), then cast
    assert calls[0]["dtype"] == (torch.float32 if gguf else torch.bfloat16)
    assert stub.moved_to == want_moves and (stub.cast_to == torch.bfloat16 if gguf else True)
    assert ("gguf_file" in calls[0]) == gguf and cached == ([path] if gguf else [])
