"""The resumable runner on a tiny model: a run killed mid-way continues with no lost or repeated
edit; nothing is written before the run is checked; reports, comparison and run labels."""
import json

import pytest
import torch

from mose_fast import EditRequest, MOSEEditor
from mose_fast.eval import runner, store

from helpers import CORPUS, make_tiny_model, tiny_mose_config, tiny_second_moments

REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French",
                    paraphrase_prompts=["Danielle Darrieux spoke"], neighborhood_prompts=["Paris is in"],
                    neighborhood_answers=["France"], case_id=i) if i % 2 == 0 else
        EditRequest("{} plays the sport of", "Michael Jordan", "soccer", target_true="basketball",
                    paraphrase_prompts=["Michael Jordan is famous for"], neighborhood_prompts=["Messi plays"],
                    neighborhood_answers=["soccer"], case_id=i) for i in range(5)]


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    (d / "glue").mkdir(parents=True)
    (d / "wikitext-2").mkdir()
    (d / "glue" / "sst2.json").write_text(json.dumps([{"sentence": s, "label": i % 2, "idx": i}
                                                      for i, s in enumerate(CORPUS[:10])]))
    (d / "wikitext-2" / "test.txt").write_text(" ".join(CORPUS))
    return d


def tiny_settings(data_dir, eval_every: int) -> runner.EvalSettings:
    """Evaluation settings small enough for the tiny model and the fixture's data."""
    return runner.EvalSettings(eval_every=eval_every, glue_n=10, ppl_tokens=200, data_dir=str(data_dir))


def setup(monkeypatch, **config):
    model, tok = make_tiny_model("llama")
    cfg = tiny_mose_config(**config)
    c0 = tiny_second_moments(model, tok, cfg.layers)
    real_init = MOSEEditor.__init__

    def init(self, *a, **k):   # feed the precomputed statistics (no WikiText corpus in tests)
        real_init(self, *a, **{**k, "second_moments": c0})
    monkeypatch.setattr(MOSEEditor, "__init__", init)
    return model, tok, cfg


@pytest.mark.model
def test_killed_run_resumes_without_lost_or_repeated_edits(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=2)
    model, tok, cfg = setup(monkeypatch)
    ref = runner.run_eval(model, tok, REQS, cfg, tmp_path / "ref", settings, "tiny", progress=False)
    ref_w = {l: model.model.layers[l].mlp.down_proj.weight.clone() for l in cfg.layers}

    model, tok, cfg = setup(monkeypatch)
    calls = {"n": 0}
    real_edit = MOSEEditor.edit

    def dying_edit(self, reqs):
        calls["n"] += 1
        if calls["n"] == 4:           # killed while doing the 4th edit
            raise KeyboardInterrupt
        return real_edit(self, reqs)
    monkeypatch.setattr(MOSEEditor, "edit", dying_edit)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 1, 2]
    monkeypatch.setattr(MOSEEditor, "edit", real_edit)

    model, tok, cfg = setup(monkeypatch)     # a fresh process: the unedited model again
    rep = runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 1, 2, 3, 4]
    assert [e["n_edits"] for e in rep["evaluations"]] == [0, 2, 4, 5]
    for l in cfg.layers:
        assert torch.equal(model.model.layers[l].mlp.down_proj.weight, ref_w[l])
    assert rep["evaluations"][-1]["edit"] == ref["evaluations"][-1]["edit"]
    assert (tmp_path / "run" / "summary.md").read_text().count("\n| ") >= 4
    assert "Seconds per edit, median (mean)" in (tmp_path / "run" / "summary.md").read_text()
    # token protocol: locality against the pre-edit predictions saved with the run
    assert rep["evaluations"][-1]["edit_token"] == ref["evaluations"][-1]["edit_token"]
    assert 0.0 <= rep["evaluations"][-1]["edit_token"]["locality"] <= 1.0
    assert (tmp_path / "run" / "locality_ref.json").is_file()
    # provenance: the resume is recorded with the number of edits it found done
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [r["n_done"] for r in run["resumes"]] == [3]
    assert rep["resumes"][0]["n_done"] == 3 and "from edit 3 by commit" in (tmp_path / "run" / "summary.md").read_text()


@pytest.mark.model
def test_run_killed_during_an_evaluation_evaluates_that_point_on_resume(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=2)
    model, tok, cfg = setup(monkeypatch)
    ref = runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "ref", settings, "tiny", progress=False)

    model, tok, cfg = setup(monkeypatch)
    real_evaluate = runner.evaluate

    def dying_evaluate(editor, requests, settings, W0, n_done, *a, **k):
        if n_done == 2:               # killed while evaluating after the 2nd edit (state saved at 2)
            raise KeyboardInterrupt
        return real_evaluate(editor, requests, settings, W0, n_done, *a, **k)
    monkeypatch.setattr(runner, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "run", settings, "tiny", progress=False)
    monkeypatch.setattr(runner, "evaluate", real_evaluate)

    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "run", settings, "tiny", progress=False)
    assert [e["n_edits"] for e in rep["evaluations"]] == [0, 2, 3]
    assert rep["evaluations"][1]["edit"] == ref["evaluations"][1]["edit"]
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 1, 2]


def test_evaluation_sample_is_fixed_by_seed_and_case_ids():
    ids = [f"case{i}" for i in range(50)]
    a = runner.evaluation_sample(ids, 10, seed=3)
    assert len(a) == 10 and a == sorted(set(a)) and all(0 <= i < 50 for i in a)
    assert runner.evaluation_sample(ids, 10, seed=3) == a                      # same seed: same cases
    assert runner.evaluation_sample(ids, 10, seed=4) != a                      # another seed: others
    # a case's membership does not depend on where it sits: reversed, the same case ids are picked
    rev = runner.evaluation_sample(ids[::-1], 10, seed=3)
    assert sorted(ids[::-1][i] for i in rev) == sorted(ids[i] for i in a)
    assert runner.evaluation_sample(ids[:7], 10, seed=3) == list(range(7))    # fewer cases than the size: all
    assert runner.evaluation_sample(ids, None, seed=3) == list(range(50))
    # uniform: over 400 seeds every case is picked about 10/50 of the time
    counts = torch.zeros(50)
    for seed in range(400):
        counts[runner.evaluation_sample(ids, 10, seed)] += 1
    assert float((counts / 400 - 0.2).abs().max()) < 0.1


@pytest.mark.model
def test_sampled_run_scores_the_same_cases_when_resumed_and_records_the_sample(tmp_path, data_dir, monkeypatch):
    """Evaluations of a sample of 2 edited cases (seed 5) plus the last batch, at edits 2 and 5: a run
    killed after its third edit and resumed scores the same cases with the same results as one that
    was not; run.json and the report record the sample's size and seed, each evaluation its case ids."""
    from mose_fast.eval.metrics import score_cases, summarize
    settings = runner.EvalSettings(batch_size=1, glue_n=10, ppl_tokens=200, data_dir=str(data_dir), eval_at=(2, 5),
                                   sample=2, sample_seed=5)
    model, tok, cfg = setup(monkeypatch)
    ref = runner.run_eval(model, tok, REQS, cfg, tmp_path / "ref", settings, "tiny", progress=False)
    rows = ref["evaluations"]
    assert [e["n_edits"] for e in rows] == [0, 2, 5]
    want = [REQS[i].case_id for i in runner.evaluation_sample([r.case_id for r in REQS], 2, 5)]
    assert rows[2]["sample"] == {"size": 2, "seed": 5, "case_ids": want}
    assert rows[0]["sample"]["case_ids"] == want                # before editing: the sample of all cases
    assert rows[1]["sample"]["case_ids"] == [0, 1]              # 2 cases edited: both
    assert rows[2]["edit"]["n"] == 2 and rows[2]["edit_last_batch"]["n"] == 1
    # the sample's scores are the edited model's scores of exactly those cases
    picked = [r for r in REQS if r.case_id in want]
    assert rows[2]["edit"]["score"] == summarize(score_cases(model, tok, picked))["score"]
    assert rows[2]["edit_last_batch"]["efficacy"] == summarize(score_cases(model, tok, REQS[4:]))["efficacy"]
    # by when they were edited: 5 edits in 5 spans of one, each sampled case alone in its own
    spans = rows[2]["edit_by_age"]
    assert [(b["first"], b["last"]) for b in spans] == [(k, k) for k in range(1, 6)]
    for b, r in zip(spans, REQS):
        if r.case_id in want:
            assert b["n"] == 1 and b["efficacy"] == summarize(score_cases(model, tok, [r]))["efficacy"]
        else:
            assert b == {"first": b["first"], "last": b["last"], "n": 0}
    assert "the scored cases by when they were edited" in (tmp_path / "ref" / "summary.md").read_text()
    run = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert run["settings"]["sample"] == 2 and run["settings"]["sample_seed"] == 5
    assert ref["settings"]["sample"] == 2 and ref["settings"]["sample_seed"] == 5
    assert len(json.loads((tmp_path / "ref" / "locality_ref.json").read_text())) == len(REQS)
    summary = (tmp_path / "ref" / "summary.md").read_text()
    assert "Row 0 scores a uniform sample of 2 of all the run's cases" in summary and "first 2 cases" not in summary

    model, tok, cfg = setup(monkeypatch)
    calls = {"n": 0}
    real_edit = MOSEEditor.edit

    def dying_edit(self, reqs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_edit(self, reqs)
    monkeypatch.setattr(MOSEEditor, "edit", dying_edit)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    monkeypatch.setattr(MOSEEditor, "edit", real_edit)
    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    for mine, theirs in zip(rep["evaluations"], rows):
        for key in ("sample", "edit", "edit_token"):        # (json: nan equals nan)
            assert json.dumps(mine[key]) == json.dumps(theirs[key]), key
    assert rep["evaluations"][2]["edit_last_batch"] == rows[2]["edit_last_batch"]
    with pytest.raises(ValueError, match="settings differs"):     # another seed is another run
        other = runner.EvalSettings(**{**settings.__dict__, "sample_seed": 6})
        runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", other, "tiny", progress=False)
    # another rule's run over the same cases borrows the sampled pre-edit row (it scored a sample of all cases)
    model, tok, cfg = setup(monkeypatch)
    cfg2 = tiny_mose_config(lam=3.0)
    borrowed = runner.run_eval(model, tok, REQS, cfg2, tmp_path / "other", settings, "tiny", progress=False,
                               initial_eval_from=tmp_path / "ref")
    assert json.dumps(borrowed["evaluations"][0]["edit"]) == json.dumps(rows[0]["edit"])


@pytest.mark.model
def test_journal_records_whether_each_edit_landed_right_after_it(tmp_path, data_dir, monkeypatch):
    from mose_fast.eval.metrics import score_cases
    settings = tiny_settings(data_dir, eval_every=3)
    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "run", settings, "tiny", progress=False)
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]

    model, tok, cfg = setup(monkeypatch)     # the same edits by hand, scored right after each
    editor = MOSEEditor(model, tok, cfg, progress=False)
    expected = []
    for r in REQS[:3]:
        editor.edit([r])
        expected.append([score_cases(model, tok, [r])[0].efficacy])
    assert [e["landed"] for e in journal] == expected
    assert rep["evaluations"][1]["landed"] == pytest.approx(sum(x[0] for x in expected) / 3)
    assert rep["evaluations"][0]["landed"] != rep["evaluations"][0]["landed"]   # row 0: no edits, nan


@pytest.mark.model
def test_resume_refuses_a_different_run(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=2)
    model, tok, cfg = setup(monkeypatch)
    runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False)
    with pytest.raises(ValueError, match="case_ids differs.*--extend"):
        runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "run", settings, "tiny", progress=False)
    with pytest.raises(ValueError, match="case_ids differs"):   # not a continuation: no extending
        runner.run_eval(model, tok, REQS[1:3], cfg, tmp_path / "run", settings, "tiny", progress=False, extend=True)
    cfg.lam = 2.0
    with pytest.raises(ValueError, match="config differs"):
        runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False)
    cfg.lam, cfg.undo_history = 1.0, 3     # bookkeeping only: the finished run is accepted again
    rep = runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False)
    assert rep["n_edits"] == 2


@pytest.mark.model
def test_run_made_before_presets_resumes_and_a_missing_rule_field_is_another_run(tmp_path, data_dir, monkeypatch):
    """A stored config without ``preset`` (bookkeeping: runs made before presets) is the same run;
    a stored config without a field that changes the edits is not."""
    settings = tiny_settings(data_dir, eval_every=2)
    model, tok, cfg = setup(monkeypatch)
    runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False)
    run_file = tmp_path / "run" / "run.json"
    stored = json.loads(run_file.read_text())
    del stored["config"]["preset"]
    run_file.write_text(json.dumps(stored))
    rep = runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "run", settings, "tiny", progress=False, extend=True)
    assert rep["n_edits"] == 3
    stored = json.loads(run_file.read_text())
    del stored["config"]["land_retries"]
    run_file.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="config differs"):
        runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "run", settings, "tiny", progress=False)


@pytest.mark.model
def test_stability_logged_against_w0(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=1)
    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False)
    ev = rep["evaluations"]
    for l in map(str, cfg.layers):
        assert ev[0]["stability"][l]["dist_w0"] == 0.0
        assert ev[2]["stability"][l]["dist_w0"] > 0.0
        assert ev[2]["stability_ratio"][l]["fro"] == pytest.approx(1.0, abs=1e-6)
        assert ev[2]["stability_ratio"][l]["kappa"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.model
def test_report_from_a_partial_run_folder(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=1)
    model, tok, cfg = setup(monkeypatch)
    calls = {"n": 0}
    real_edit = MOSEEditor.edit

    def dying_edit(self, reqs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_edit(self, reqs)
    monkeypatch.setattr(MOSEEditor, "edit", dying_edit)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    rep = store.report_from_folder(tmp_path / "run")
    assert rep["n_edits"] == 2 and [e["n_edits"] for e in rep["evaluations"]] == [0, 1, 2]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "partial: 2 of 5 planned edits" in summary
    assert (tmp_path / "run" / "plots.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        store.report_from_folder(tmp_path)


@pytest.mark.model
def test_extend_continues_a_finished_run_as_if_planned_longer(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=2)
    model, tok, cfg = setup(monkeypatch)
    runner.run_eval(model, tok, REQS[:4], cfg, tmp_path / "ref", settings, "tiny", progress=False)
    ref_w = {l: model.model.layers[l].mlp.down_proj.weight.clone() for l in cfg.layers}

    model, tok, cfg = setup(monkeypatch)
    runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False)
    model, tok, cfg = setup(monkeypatch)      # a new process: the model comes back from the state file
    rep = runner.run_eval(model, tok, REQS[:4], cfg, tmp_path / "run", settings, "tiny", progress=False, extend=True)
    for l in cfg.layers:
        assert torch.equal(model.model.layers[l].mlp.down_proj.weight, ref_w[l])
    journal = [json.loads(x) for x in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [j["index"] for j in journal] == [0, 1, 2, 3]
    assert [e["n_edits"] for e in rep["evaluations"]] == [0, 2, 4]
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stored["case_ids"] == [r.case_id for r in REQS[:4]]
    assert [(x["from"], x["to"]) for x in stored["extended"]] == [(2, 4)]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "Extended from 2 to 4" in summary and "first 2 cases" in summary


@pytest.mark.model
def test_initial_eval_borrowed_from_a_matching_run_only(tmp_path, data_dir, monkeypatch):
    settings = tiny_settings(data_dir, eval_every=2)
    model, tok, cfg = setup(monkeypatch)
    src = runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "src", settings, "tiny", progress=False)

    model, tok, cfg = setup(monkeypatch)
    cfg.lam = 3.0                              # another rule setting: row 0 is still the unedited model
    cfg.layers = cfg.layers[:-1]               # other layers: row 0's stability must be this run's own
    seen = []
    real_evaluate = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: seen.append(a[4]) or real_evaluate(*a, **k))
    rep = runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run", settings, "tiny", progress=False,
                          initial_eval_from=tmp_path / "src")
    assert seen == [2]                         # only the evaluation after the edits ran
    assert rep["evaluations"][0]["edit"] == src["evaluations"][0]["edit"]
    assert rep["evaluations"][0]["general"] == src["evaluations"][0]["general"]
    assert (tmp_path / "run" / "locality_ref.json").read_text() == (tmp_path / "src" / "locality_ref.json").read_text()
    assert (json.loads((tmp_path / "run" / "run.json").read_text())["initial_eval_from"]["folder"]
            == str(tmp_path / "src"))
    row0 = rep["evaluations"][0]["stability"]
    assert sorted(map(int, row0)) == cfg.layers
    for l in cfg.layers:
        W = model.model.layers[l].mlp.down_proj.weight.double()
        assert row0[str(l)]["fro"] == pytest.approx(float(W.norm()), rel=1e-5)   # MOSE keeps ‖W‖_F: W0's value
        assert row0[str(l)]["dist_w0"] == 0.0

    other = runner.EvalSettings(eval_every=2, glue_n=5, ppl_tokens=200, data_dir=str(data_dir))
    with pytest.raises(ValueError, match="settings.glue_n"):
        runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "bad1", other, "tiny", progress=False,
                        initial_eval_from=tmp_path / "src")
    with pytest.raises(ValueError, match="case_ids"):
        runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "bad2", settings, "tiny", progress=False,
                        initial_eval_from=tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "bad3", settings, "tiny", progress=False,
                        initial_eval_from=tmp_path)

    # a source extended since keeps its row 0 over its first cases: still the row of a 2-case run
    model, tok, cfg = setup(monkeypatch)
    runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "src", settings, "tiny", progress=False, extend=True)
    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS[:2], cfg, tmp_path / "run2", settings, "tiny", progress=False,
                          initial_eval_from=tmp_path / "src")
    assert rep["evaluations"][0]["edit"] == src["evaluations"][0]["edit"]
    with pytest.raises(ValueError, match="case_ids"):
        runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "bad4", settings, "tiny", progress=False,
                        initial_eval_from=tmp_path / "src")


@pytest.mark.model
def test_compare_reads_each_runs_rows_and_refuses_other_cases(tmp_path, data_dir, monkeypatch):
    from mose_fast.eval import compare
    settings = tiny_settings(data_dir, eval_every=1)
    reps = {}
    memit = {"method": "memit", "preset_name": "memit", "rule_hparams": {"mom2_update_weight": 100.0}}
    for name, config, reqs in (("mose", {}, REQS[:2]), ("memit", memit, REQS[:3]), ("other", {}, REQS[1:3])):
        model, tok, cfg = setup(monkeypatch, **config)
        reps[name] = runner.run_eval(model, tok, reqs, cfg, tmp_path / name, settings, "tiny", progress=False)
    cmp = compare.write_comparison([tmp_path / "mose", tmp_path / "memit"], tmp_path / "cmp")
    assert list(cmp["table"]) == [1, 2]                  # the points both runs reached (0: unedited model)
    only = compare.compare_runs([tmp_path / "mose", tmp_path / "memit"], at=[2, 3])
    assert [r["label"][:7] for r in only["table"][3]] == ["memit ("]   # a table holds the runs evaluated there
    for n in (1, 2):
        for row, name in zip(cmp["table"][n], ("mose", "memit")):
            e = reps[name]["evaluations"][n]
            assert row["score"] == e["edit"]["score"] and row["efficacy"] == e["edit"]["efficacy"]
            assert row["general"]["sst2"] == (e["general"]["sst2"], e["retention"]["sst2"])
            fro = [r["fro"] for r in e["stability_ratio"].values()]
            assert row["fro"] == max(fro, key=lambda x: abs(x - 1))
    assert cmp["table"][2][0]["label"].startswith("mose (") and cmp["table"][2][1]["label"].startswith("memit (")
    assert "side=output" in cmp["table"][2][0]["label"]
    assert abs(cmp["table"][2][1]["fro"] - 1) > abs(cmp["table"][2][0]["fro"] - 1)   # additive grows, rotation keeps
    # the age panel's data: each run's last evaluation that split its cases by when they were edited
    for series, name, last in zip(cmp["series"], ("mose", "memit"), (2, 3)):
        assert series["by_age"] == {"n_edits": last, "spans": reps[name]["evaluations"][-1]["edit_by_age"]}
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## after 2 sequential edits" in md and (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="edited other cases"):
        compare.compare_runs([tmp_path / "mose", tmp_path / "other"])
    with pytest.raises(ValueError, match="no run has an evaluation at"):
        compare.compare_runs([tmp_path / "mose", tmp_path / "memit"], at=[4])


def _label(cfg, batch_size=1):
    from mose_fast.eval.compare import run_label
    return run_label({"config": cfg.to_dict() if hasattr(cfg, "to_dict") else cfg,
                      "settings": {"batch_size": batch_size}})


def test_run_label_names_the_preset_and_every_setting_it_overrides():
    from mose_fast.config import MOSEConfig
    assert _label(MOSEConfig.preset("mose")) == "mose"
    assert _label(MOSEConfig()) == "mose"
    assert _label(MOSEConfig.preset("mose", lam=2.0, land_retries=0)) == "mose (lam=2, land_retries=0)"
    assert _label(MOSEConfig.preset("memit", layers=[3, 4, 5]), batch_size=10) == "memit (layers L3-5, batch 10)"
    assert _label(MOSEConfig.preset("mose-paper", polar_method="krylov")) == "mose-paper (polar_method=krylov)"
    capped = MOSEConfig.preset("mose")
    capped.rule_hparams = {**capped.rule_hparams, "memory_cap": 10.0}
    assert _label(capped) == "mose (memory_cap=10)"
    # rule options left out of an override take the rule's defaults, and the label says so
    fewer = MOSEConfig.preset("mose", rule_hparams={"side": "input", "edit_memory": 100.0})
    assert _label(fewer) == "mose (lam_unit=absolute, memory_cap=None)"
    labels = {_label(c) for c in (MOSEConfig.preset("mose"), capped, fewer, MOSEConfig.preset("mose", lam=2.0))}
    assert len(labels) == 4


def test_run_label_of_a_run_made_before_presets_names_its_method_and_every_rule_option():
    base = {"method": "mose", "lam": 1000.0, "layers": [4, 5, 6, 7, 8],
            "rule_hparams": {"side": "input", "retain": "original", "edit_memory": 100.0}}
    assert _label(base) == "MOSE L4-8 (λ=1000, side=input, retain=original, edit_memory=100)"
    capped = {**base, "rule_hparams": {**base["rule_hparams"], "memory_cap": 30.0}}
    assert _label(capped) == "MOSE L4-8 (λ=1000, side=input, retain=original, edit_memory=100, memory_cap=30)"
    assert _label(base, 10) == "MOSE L4-8 (λ=1000, side=input, retain=original, edit_memory=100, batch 10)"
    retried = {**base, "land_retries": 2, "land_boost": 4.0}
    assert _label(retried, 10) == ("MOSE L4-8 (λ=1000, side=input, retain=original, edit_memory=100, "
                                   "land_retries=2×4, batch 10)")
    assert _label({"method": "alphaedit", "lam": 1.0, "layers": [4, 5, 6, 7, 8], "rule_hparams": {}}, 10) == \
        "ALPHAEDIT L4-8 (batch 10)"


@pytest.mark.model
def test_batch_run_journal_counts_cases_and_resumes_without_repeats(tmp_path, data_dir, monkeypatch):
    # batch 2: the journal's index is the position of each batch's first case (0, 2, 4), so the
    # landed windows and a resume count cases, not edit calls
    settings = runner.EvalSettings(eval_every=2, batch_size=2, glue_n=10, ppl_tokens=200, data_dir=str(data_dir))
    model, tok, cfg = setup(monkeypatch)
    real_edit = MOSEEditor.edit
    calls = {"n": 0}

    def edit_then_die(self, reqs):   # killed after the second batch is journaled and saved
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_edit(self, reqs)
    monkeypatch.setattr(MOSEEditor, "edit", edit_then_die)
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, REQS[:5], cfg, tmp_path / "run", settings, "tiny", progress=False)
    monkeypatch.setattr(MOSEEditor, "edit", real_edit)
    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS[:5], cfg, tmp_path / "run", settings, "tiny", progress=False)
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 2, 4]
    assert [c for e in journal for c in e["case_ids"]] == [r.case_id for r in REQS[:5]]
    assert [e["n_edits"] for e in rep["evaluations"]] == [0, 2, 4, 5]
    for ev, lo, hi in zip(rep["evaluations"][1:], (0, 2, 4), (2, 4, 5)):
        window = [x for e in journal if lo <= e["index"] < hi for x in e["landed"]]
        assert len(window) == hi - lo and ev["landed"] == pytest.approx(sum(window) / len(window))
    # timings are per journal entry: one edit call of two cases here, said so in the summary
    assert "Seconds per edit call (a batch of 2), median (mean)" in (tmp_path / "run" / "summary.md").read_text()


def test_eval_settings_validate_checks_values_and_the_data_files(tmp_path, data_dir):
    tiny_settings(data_dir, eval_every=2).validate()
    for field, value in (("eval_every", 0), ("batch_size", 1.5), ("checkpoint_every", True)):
        settings = tiny_settings(data_dir, eval_every=2)
        setattr(settings, field, value)
        with pytest.raises(ValueError, match=field):
            settings.validate()
    with pytest.raises(ValueError, match="glue task 'sst3'"):
        runner.EvalSettings(glue_tasks=("sst3",), data_dir=str(data_dir)).validate()
    with pytest.raises(FileNotFoundError, match="glue.*mrpc.json not found"):
        runner.EvalSettings(glue_tasks=("mrpc",), data_dir=str(data_dir)).validate()
    (data_dir / "wikitext-2" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="wikitext-2.*test.txt not found"):
        tiny_settings(data_dir, eval_every=2).validate()
    runner.EvalSettings(glue_n=10, ppl_tokens=0, data_dir=str(data_dir)).validate()     # no perplexity: no file


@pytest.mark.model
def test_nothing_is_written_before_settings_config_and_requests_are_checked(tmp_path, data_dir, monkeypatch):
    model, tok, cfg = setup(monkeypatch)
    out = tmp_path / "run"
    empty = tmp_path / "no-data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="sst2.json"):
        runner.run_eval(model, tok, REQS[:2], cfg, out, tiny_settings(empty, 2), "tiny", progress=False)
    bad_cfg = tiny_mose_config(lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        runner.run_eval(model, tok, REQS[:2], bad_cfg, out, tiny_settings(data_dir, 2), "tiny", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        runner.run_eval(model, tok, REQS[:2], tiny_mose_config(layers=[1, 9]), out, tiny_settings(data_dir, 2), "tiny",
                        progress=False)
    with pytest.raises(ValueError, match="expected EditRequest"):
        runner.run_eval(model, tok, [REQS[0], {"prompt": "x"}], cfg, out, tiny_settings(data_dir, 2), "tiny",
                        progress=False)
    assert not out.exists()
    rep = runner.run_eval(model, tok, REQS[:2], cfg, out, tiny_settings(data_dir, 2), "tiny", progress=False)
    assert rep["n_edits"] == 2 and (out / "run.json").is_file()


@pytest.mark.model
def test_checkpoint_every_saves_the_editor_state_and_a_resume_redoes_only_unsaved_edits(tmp_path, data_dir,
                                                                                         monkeypatch):
    """checkpoint_every = 2, one evaluation at the end: killed during the 4th edit, the state holds 2
    edits (the 3rd is journaled but not saved); the resume redoes edits 3-5 once each and ends
    where an uninterrupted run ends.  The state file is the editor's state_dict()."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    settings = runner.EvalSettings(eval_every=10, glue_n=10, ppl_tokens=200, data_dir=str(data_dir), checkpoint_every=2)
    model, tok, cfg = setup(monkeypatch)
    runner.run_eval(model, tok, REQS, cfg, tmp_path / "ref", settings, "tiny", progress=False)
    ref_w = {l: model.model.layers[l].mlp.down_proj.weight.clone() for l in cfg.layers}

    model, tok, cfg = setup(monkeypatch)
    real_edit, calls, saved_at = MOSEEditor.edit, {"n": 0}, []

    def dying_edit(self, reqs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_edit(self, reqs)
    monkeypatch.setattr(MOSEEditor, "edit", dying_edit)
    real_state_dict = MOSEEditor.state_dict
    monkeypatch.setattr(MOSEEditor, "state_dict", lambda self: saved_at.append(self.n_edits) or real_state_dict(self))
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    assert saved_at == [2]                                      # saved once, after the 2nd edit
    path = tmp_path / "run" / "state.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["n_done"] == "2"
    saved = load_file(str(path))
    assert set(saved) == {"n_edits", "weight.1", "weight.2", "rule.P.1", "rule.P.2"} and int(saved["n_edits"]) == 2
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 1, 2]
    monkeypatch.setattr(MOSEEditor, "edit", real_edit)
    monkeypatch.setattr(MOSEEditor, "state_dict", real_state_dict)

    model, tok, cfg = setup(monkeypatch)
    rep = runner.run_eval(model, tok, REQS, cfg, tmp_path / "run", settings, "tiny", progress=False)
    journal = [json.loads(l) for l in (tmp_path / "run" / "journal.jsonl").read_text().splitlines()]
    assert [e["index"] for e in journal] == [0, 1, 2, 3, 4]
    assert [e["n_edits"] for e in rep["evaluations"]] == [0, 5]
    for l in cfg.layers:
        assert torch.equal(model.model.layers[l].mlp.down_proj.weight, ref_w[l])
        assert torch.equal(load_file(str(path))[f"weight.{l}"], ref_w[l])


def test_background_edits_are_made_first_and_never_scored(tmp_path, data_dir, monkeypatch):
    """Cases 0-1 are background, 2-4 the run's own: row 0 scores the three own cases unedited, a row after
    k edits the own cases edited so far (a sample draws only from them), their spans numbered as edits
    of the whole run; the final scores are the edited model's scores of cases 2-4."""
    from mose_fast.eval.metrics import score_cases, summarize
    settings = runner.EvalSettings(batch_size=1, glue_n=10, ppl_tokens=200, data_dir=str(data_dir), eval_at=(3, 5),
                                   background=2)
    model, tok, cfg = setup(monkeypatch)
    before = summarize(score_cases(model, tok, REQS[2:]))
    rep = runner.run_eval(model, tok, REQS, cfg, tmp_path / "bg", settings, "tiny", progress=False)
    rows = rep["evaluations"]
    assert [e["n_edits"] for e in rows] == [0, 3, 5]
    assert [e["edit"]["n"] for e in rows] == [3, 1, 3]
    assert rows[0]["edit"]["efficacy"] == before["efficacy"]
    assert rows[2]["edit"]["score"] == summarize(score_cases(model, tok, REQS[2:]))["score"]
    assert [(b["first"], b["last"], b["n"]) for b in rows[2]["edit_by_age"]] == [(3, 3, 1), (4, 4, 1), (5, 5, 1)]
    assert "after the 2 background edits" in rows[2]["edit"]["cases"]
    assert rep["settings"]["background"] == 2 and len(rep["case_ids"]) == 5
    journal = store.read_lines(tmp_path / "bg" / "journal.jsonl", lambda e: True)
    assert [c for j in journal for c in j["case_ids"]] == [0, 1, 2, 3, 4]
    # with a sample: only own cases are drawn
    sampled = runner.EvalSettings(batch_size=1, glue_n=10, ppl_tokens=200, data_dir=str(data_dir), eval_at=(5,),
                                  background=2, sample=2)
    model, tok, cfg = setup(monkeypatch)
    rows = runner.run_eval(model, tok, REQS, cfg, tmp_path / "bg-sample", sampled, "tiny",
                           progress=False)["evaluations"]
    assert set(rows[1]["sample"]["case_ids"]) <= {2, 3, 4} and rows[1]["edit"]["n"] == 2
    with pytest.raises(ValueError, match="whole batches"):
        runner.EvalSettings(batch_size=2, background=3, data_dir=str(data_dir), glue_tasks=()).validate()


def test_control_cases_are_scored_at_every_evaluation_and_never_edited(tmp_path, data_dir, monkeypatch):
    """Cases 3-4 as controls of a run editing cases 0-2: every evaluation scores them as the model stands
    (row 0: the unedited model's scores of them, the last row the edited model's), the summary and the
    comparison show them, and a run that edits a control case is refused before its first edit."""
    from mose_fast.eval import compare
    from mose_fast.eval.metrics import score_cases, summarize
    controls = tmp_path / "controls.json"
    controls.write_text(json.dumps([{"case_id": r.case_id, "requested_rewrite": {
        "prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new},
        "target_true": {"str": r.target_true}}, "paraphrase_prompts": r.paraphrase_prompts,
        "neighborhood_prompts": r.neighborhood_prompts} for r in REQS[3:]]))
    settings = runner.EvalSettings(batch_size=1, glue_n=10, ppl_tokens=200, data_dir=str(data_dir), eval_at=(2, 3),
                                   control=str(controls), control_n=2)
    model, tok, cfg = setup(monkeypatch)
    ctl = runner.control_cases(settings)
    assert [r.case_id for r in ctl] == [3, 4]
    before = summarize(score_cases(model, tok, ctl))
    rep = runner.run_eval(model, tok, REQS[:3], cfg, tmp_path / "ctl", settings, "tiny", progress=False)
    rows = rep["evaluations"]
    assert rows[0]["control"] == before
    after = summarize(score_cases(model, tok, ctl))
    assert rows[-1]["control"] == after and after != before          # the edits moved the controls
    assert "Cases the run never edits (2 of" in (tmp_path / "ctl" / "summary.md").read_text()
    cmp = compare.compare_runs([tmp_path / "ctl"], at=[3])
    assert cmp["table"][3][0]["control_score"] == after["score"]
    model, tok, cfg = setup(monkeypatch)
    with pytest.raises(ValueError, match="are edited by the run"):
        runner.run_eval(model, tok, REQS, cfg, tmp_path / "bad", settings, "tiny", progress=False)
    assert not (tmp_path / "bad" / "journal.jsonl").exists()
    with pytest.raises(ValueError, match="a control file needs"):
        runner.EvalSettings(control=str(controls), data_dir=str(data_dir), glue_tasks=(), ppl_tokens=0).validate()
