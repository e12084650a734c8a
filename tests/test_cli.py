"""The command line: every bad input is reported before any model is loaded, naming the file and
the field; a failed start leaves nothing behind; the default preset is announced and applied."""
import json

import pytest

from mose_fast import MOSEConfig, cli

from helpers import CORPUS, make_tiny_model

GOOD = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_new": "English", "ground_truth": "French"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = make_tiny_model("llama")
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def no_model_load(monkeypatch):
    import mose_fast.hf.models as models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(models, "load_model", refuse)


def _requests(tmp_path, records, name="edits.json"):
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.model
@pytest.mark.parametrize("records, flags, message", [
    ("[{not json", [], "not JSON"),
    ([{**GOOD, "subject": "Jean Gabin"}], [], "does not occur in prompt"),
    ([{**GOOD, "target_new": "  "}], [], "'target_new' is empty"),
    ([{"prompt": "x"}], [], "unrecognised edit-request schema"),
    ([GOOD], ["--layers", "2-9"], "out of range"),
    ([GOOD], ["--lam", "-1"], "lam = -1.0"),
    ([GOOD], ["--preset", "mose-fast"], "unknown preset 'mose-fast'"),
    ([GOOD], ["--polar-method", "qr"], "polar_method = 'qr'"),
    ([GOOD], ["--land-retries", "-2"], "land_retries = -2"),
    ([GOOD], ["--modules", "attn.k,mlp.down"], "unknown module(s) ['attn.k']"),
    ([GOOD], ["--preset", "memit", "--modules", "attn.v,mlp.down"], "need method 'mose'"),
])
def test_edit_reports_bad_input_before_loading_the_model(tiny_dir, tmp_path, capsys, no_model_load,
                                                         records, flags, message):
    path = _requests(tmp_path, records)
    rc, _, err = _run(["edit", "--model", tiny_dir, "--requests", path, "--out", tmp_path / "out", *flags], capsys)
    assert rc == 2
    assert message in err
    if isinstance(records, str) or "subject" in message or "target_new" in message or "schema" in message:
        assert str(path) in err                          # the message names the file
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_missing_files_and_fields_are_named(tiny_dir, tmp_path, capsys, no_model_load):
    rc, _, err = _run(["edit", "--model", tiny_dir, "--requests", tmp_path / "nope.json",
                       "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "nope.json" in err and "not found" in err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "mose", "lamda": 3}))
    path = _requests(tmp_path, [GOOD])
    rc, _, err = _run(["edit", "--model", tiny_dir, "--requests", path, "--config", cfg,
                       "--out", tmp_path / "o"], capsys)
    assert rc == 2 and str(cfg) in err and "lamda" in err
    cfg.write_text(json.dumps({"rule_hparams": {"side": "input", "edit_memory": -1}}))
    rc, _, err = _run(["edit", "--model", tiny_dir, "--requests", path, "--config", cfg,
                       "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "rule_hparams.edit_memory" in err
    rc, _, err = _run(["edit", "--model", tmp_path / "no-model", "--requests", path, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "no-model" in err


@pytest.mark.model
def test_edit_refuses_an_output_folder_holding_something_else(tiny_dir, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    rc, _, err = _run(["edit", "--model", tiny_dir, "--requests", _requests(tmp_path, [GOOD]), "--out", out,
                       "--layers", "1-2"], capsys)
    assert rc == 2 and "not an empty folder" in err
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.model
def test_a_failed_eval_start_leaves_the_folder_reusable(tiny_dir, tmp_path, capsys, no_model_load):
    """A mistyped preset, then missing evaluation data: neither writes run.json, so the corrected
    command is not refused as 'a different run'."""
    from mose_fast.eval.runner import EvalSettings, run_identity
    from mose_fast.eval.store import RunFolder
    data = tmp_path / "data"
    (data / "glue").mkdir(parents=True)
    (data / "wikitext-2").mkdir()
    reqs = _requests(tmp_path, [GOOD, {**GOOD, "subject": "Danielle Darrieux", "target_new": "German"}])
    out = tmp_path / "run"
    base = ["eval", "--model", tiny_dir, "--dataset", reqs, "--n-edits", "2", "--data-dir", data, "--out", out,
            "--layers", "1-2"]
    rc, _, err = _run(base + ["--preset", "mosee"], capsys)
    assert rc == 2 and "unknown preset 'mosee'" in err
    rc, _, err = _run(base + ["--preset", "mose"], capsys)
    assert rc == 2 and "sst2.json" in err                    # the data are checked before the model loads
    assert not (out / "run.json").exists()
    # a run folder holding another run is refused before the model loads, naming what differs
    settings = EvalSettings(glue_tasks=(), ppl_tokens=0, data_dir=str(data))
    other = run_identity(str(tiny_dir), MOSEConfig.preset("memit", "llama", layers=[1, 2]), settings, [])
    RunFolder(out).check_or_start({**other, "case_ids": [None, None]})
    rc, _, err = _run(base + ["--preset", "mose", "--glue-tasks", "", "--ppl-tokens", "0"], capsys)
    assert rc == 2 and "holds a different run (config differs)" in err


@pytest.mark.model
def test_zsre_passes_over_a_record_without_a_new_answer_and_counts_before_loading(tiny_dir, tmp_path, capsys,
                                                                                  no_model_load):
    mend = {"subject": "Danielle Darrieux", "src": "The mother tongue of Danielle Darrieux is", "alt": "English",
            "answers": ["French"], "rephrase": "Danielle Darrieux speaks", "loc": "nq question: who", "loc_ans": "x"}
    data = tmp_path / "data"
    (data / "zsre").mkdir(parents=True)
    (data / "zsre" / "zsre_mend_train-1k.json").write_text(json.dumps([mend, {**mend, "alt": ""}, mend]))
    base = ["eval", "--model", tiny_dir, "--dataset", "zsre", "--data-dir", data, "--out", tmp_path / "run",
            "--layers", "1-2"]
    rc, out, err = _run(base + ["--n-edits", "3"], capsys)
    assert rc == 2 and "2 usable requests from record 0 on, 3 asked (1 passed over: #1: " in err
    rc, out, err = _run(base + ["--n-edits", "2"], capsys)     # then stops at the missing GLUE data
    assert "zsre_mend_train-1k.json: record #1 passed over:" in out and "'target_new' is empty" in out
    assert rc == 2 and "sst2.json" in err and not (tmp_path / "run" / "run.json").exists()


@pytest.mark.model
def test_edit_without_a_preset_uses_and_announces_the_mose_preset(tiny_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out = tmp_path / "edited"
    rc, stdout, err = _run(["edit", "--model", tiny_dir, "--requests", _requests(tmp_path, [GOOD]), "--out", out,
                            "--layers", "1-2", "--stats-corpus", corpus, "--stats-tokens", "400"], capsys)
    assert rc == 0, err
    assert "preset 'mose'" in stdout and "changed: layers: [4, 5, 6, 7, 8] → [1, 2]" in stdout
    journal = json.loads((out / "mose_journal.json").read_text())
    want = MOSEConfig.preset("mose", "llama", layers=[1, 2], stats_corpus=str(corpus), stats_tokens=400).to_dict()
    assert journal["config"] == want
    assert [e["op"] for e in journal["entries"]] == ["edit"]


def test_the_banner_names_what_a_configuration_changed_from_its_preset():
    from mose_fast.config import PRESETS
    base = MOSEConfig.preset("mose", "llama")
    hp = {**base.rule_hparams, "memory_cap": 300.0}
    cfg = MOSEConfig.from_dict({"preset": "mose", "lam": 2.0, "rule_hparams": hp}, "llama")
    assert cli.config_changes(cfg, "llama") == [f"lam: {base.lam!r} → 2.0",
                                                 "rule_hparams.memory_cap: "
                                                 f"{base.rule_hparams['memory_cap']!r} → 300.0"]
    text = cli._describe(cfg, "llama")
    assert text.startswith(f"preset 'mose' ({PRESETS['mose'].summary}), changed: lam: ")
    assert cli.config_changes(base, "llama") == [] and "changed" not in cli._describe(base, "llama")


def test_presets_lists_every_preset(capsys):
    from mose_fast.config import PRESETS
    rc, out, _ = _run(["presets"], capsys)
    assert rc == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == list(PRESETS)


@pytest.mark.model
@pytest.mark.parametrize("modules", ["mlp.down", "mlp.in,attn.v"])
def test_a_failed_save_keeps_the_edits_and_apply_writes_them(tiny_dir, tmp_path, capsys, monkeypatch, modules):
    """Saving fails after the edits: every edited matrix (whatever the modules) and the journal land in
    the rescue folder, and `apply` writes a model whose every parameter equals the edited model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from mose_fast.editor import MOSEEditor
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    edited = {}

    def failing_save(self, out_dir, dtype=None):
        edited.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        raise OSError("disk full")
    monkeypatch.setattr(MOSEEditor, "save", failing_save)
    out = tmp_path / "edited"
    flags = ["--model", tiny_dir, "--layers", "1-2", "--stats-corpus", corpus, "--stats-tokens", "400"]
    rc, _, err = _run(["edit", *flags, "--requests", _requests(tmp_path, [GOOD]), "--out", out,
                       "--modules", modules], capsys)
    assert rc == 1 and "disk full" in err and "mose-fast apply" in err
    rescue = out / "edits"
    assert (rescue / "edits.safetensors").is_file() and (rescue / "mose_journal.json").is_file()
    monkeypatch.undo()
    rc, _, err = _run(["apply", "--model", tiny_dir, "--edits", rescue, "--out", tmp_path / "applied"], capsys)
    assert rc == 0, err
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    changed = [k for k in edited if not torch.equal(edited[k], original[k])]
    assert changed, "the edit changed nothing"
    wanted = {"mlp.down": ["down_proj"], "mlp.in,attn.v": ["gate_proj", "up_proj", "v_proj"]}[modules]
    assert all(any(w in k for w in wanted) for k in changed) and all(any(w in k for k in changed) for w in wanted)
    for k, v in edited.items():
        assert torch.equal(applied[k], v), k


@pytest.mark.model
def test_apply_checks_its_folder_before_loading_the_model(tiny_dir, tmp_path, capsys, no_model_load):
    edits = tmp_path / "edits"
    edits.mkdir()
    rc, _, err = _run(["apply", "--model", tiny_dir, "--edits", edits, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "edits.safetensors" in err and "not found" in err
    (edits / "edits.safetensors").write_bytes(b"")
    journal = edits / "mose_journal.json"
    journal.write_text(json.dumps({"config": MOSEConfig.preset("mose", "llama", layers=[1, 9]).to_dict()}))
    rc, _, err = _run(["apply", "--model", tiny_dir, "--edits", edits, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and str(journal) in err and "out of range" in err


@pytest.mark.model
def test_background_and_control_cases_are_checked_before_loading(tiny_dir, tmp_path, capsys, no_model_load):
    own = _requests(tmp_path, [GOOD, {**GOOD, "target_new": "German"}])
    other = _requests(tmp_path, [{**GOOD, "case_id": 10 + i, "target_new": t}
                                 for i, t in enumerate(("Dutch", "Latin"))], "other.json")
    data = tmp_path / "data"
    (data / "glue").mkdir(parents=True)
    (data / "wikitext-2").mkdir()
    base = ["eval", "--model", tiny_dir, "--dataset", own, "--n-edits", "2", "--data-dir", data,
            "--out", tmp_path / "run", "--layers", "1-2", "--glue-tasks", "", "--ppl-tokens", "0"]
    for flags, message in [(["--background-n", "2"], "--background-n needs --background FILE"),
                           (["--background", other], "needs --background-n N"),
                           (["--background", other, "--background-n", "3"],
                            "2 usable requests from record 0 on, 3 asked"),
                           (["--background", own, "--background-n", "1"], "also among the run's own cases"),
                           (["--background", other, "--background-n", "2", "--eval-at", "2,4"],
                            "every point must come after the 2 background edits"),
                           (["--background", other, "--background-n", "1", "--batch-size", "2"],
                            "the background must be whole batches"),
                           (["--control", other], "a control file needs a number of its cases"),
                           (["--control", tmp_path / "none.json", "--control-n", "2"], "none.json not found"),
                           (["--control", own, "--control-n", "1"], "are edited by the run")]:
        rc, _, err = _run(base + flags, capsys)
        assert rc == 2 and message in err, (flags, err)
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.model
def test_eval_with_background_and_control_cases_end_to_end(tiny_dir, tmp_path, capsys):
    """Two background edits, two own cases in batches of one, one control case: the journal holds all four
    edits in order, the evaluations score the own cases (ages counted as edits 3-4) and the control case,
    and run.json records both settings."""
    own = _requests(tmp_path, [{**GOOD, "case_id": 1}, {**GOOD, "case_id": 2, "target_new": "German"}])
    other = _requests(tmp_path, [{**GOOD, "case_id": 10 + i, "target_new": t}
                                 for i, t in enumerate(("Dutch", "Latin", "Greek"))], "other.json")
    data = tmp_path / "data"
    (data / "glue").mkdir(parents=True)
    (data / "wikitext-2").mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(CORPUS))
    out = tmp_path / "run"
    rc, stdout, err = _run(["eval", "--model", tiny_dir, "--dataset", own, "--n-edits", "2", "--data-dir", data,
                            "--out", out, "--layers", "1-2", "--glue-tasks", "", "--ppl-tokens", "0",
                            "--stats-corpus", corpus, "--stats-tokens", "400", "--eval-at", "3,4",
                            "--background", other, "--background-n", "2", "--control", other, "--control-n", "3"],
                           capsys)
    assert rc == 2 and "are edited by the run" in err          # the background's cases cannot be controls
    control = _requests(tmp_path, [{**GOOD, "case_id": 20, "target_new": "Welsh"}], "control.json")
    rc, stdout, err = _run(["eval", "--model", tiny_dir, "--dataset", own, "--n-edits", "2", "--data-dir", data,
                            "--out", out, "--layers", "1-2", "--glue-tasks", "", "--ppl-tokens", "0",
                            "--stats-corpus", corpus, "--stats-tokens", "400", "--eval-at", "3,4",
                            "--background", other, "--background-n", "2", "--control", control, "--control-n", "1"],
                           capsys)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["case_ids"] == [10, 11, 1, 2]
    assert run["settings"]["background"] == 2 and run["settings"]["control_n"] == 1
    rows = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [(e["n_edits"], e["edit"]["n"], e["control"]["n"]) for e in rows] == [(0, 2, 1), (3, 1, 1), (4, 2, 1)]
    assert [(b["first"], b["last"]) for b in rows[-1]["edit_by_age"]] == [(3, 3), (4, 4)]
    assert "Cases the run never edits (1 of" in stdout
