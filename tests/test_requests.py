import json

import pytest

from mose_fast.hf.tokens import subject_last_index
from mose_fast.requests import EditRequest, detect_schema, load_requests, parse_records

from helpers import tiny_tokenizer


def test_template_and_text():
    r = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English")
    assert r.template == "The mother tongue of {} is"
    assert r.text == "The mother tongue of Danielle Darrieux is"
    r2 = EditRequest("{}, whose mother tongue is", "Danielle Darrieux", "English")
    assert r2.text == "Danielle Darrieux, whose mother tongue is"


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt="", subject="X", target_new="Y"), "'prompt'"),
    (dict(prompt="X is", subject="  ", target_new="Y"), "'subject'"),
    (dict(prompt="X is", subject="X", target_new="   "), "'target_new'"),
    (dict(prompt="X is", subject="X", target_new=3), "'target_new' must be a string"),
    (dict(prompt="X is", subject="X", target_new="Y", target_true=""), "'target_true'"),
    (dict(prompt="X is", subject="X", target_new="Y", paraphrase_prompts=["ok", ""]), "paraphrase_prompts\\[1\\]"),
])
def test_bad_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EditRequest(**kwargs, case_id=7)


def test_error_names_the_request():
    with pytest.raises(ValueError, match="case_id=42"):
        EditRequest("X is", "X", "", case_id=42)


def test_subject_must_occur_in_prompt():
    with pytest.raises(ValueError, match="does not occur in prompt"):
        EditRequest("The capital of France is", "Germany", "Berlin")
    with pytest.raises(ValueError, match="more than one"):
        EditRequest("{} and {} are", "X", "Y")


def test_subject_that_tokenises_to_nothing():
    tok = tiny_tokenizer()
    r = EditRequest("The \u200b is", "\u200b", "Y")

    class NoTokens:
        def __call__(self, text, **kw):
            return {"input_ids": [] if text == "\u200b" else tok(text, **kw)["input_ids"]}
    with pytest.raises(ValueError, match="'subject'.*tokenises to nothing"):
        r.validate_tokens(NoTokens())


def test_subject_last_index_points_at_last_subject_token():
    tok = tiny_tokenizer()
    ids, idx = subject_last_index(tok, "The mother tongue of {} is", "Danielle Darrieux")
    prefix = tok("The mother tongue of Danielle Darrieux")["input_ids"]
    assert ids[:len(prefix)] == prefix or idx == len(prefix) - 1
    assert tok.decode(ids[:idx + 1]).endswith("Darrieux")
    assert not tok.decode(ids[:idx]).endswith("Darrieux")


ROME = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": {"str": "English"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"]}
EASY = {"case_id": 1, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux spoke",
        "locality_prompt": "The mother tongue of Léon Blum is", "locality_ground_truth": "French"}
MEND = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
        "rephrase": "What university did Watts Humphrey go to?",
        "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}


def test_schema_readers():
    assert [detect_schema(x) for x in (ROME, EASY, MEND)] == ["rome", "easyedit", "mend"]
    r, e, m = parse_records([ROME, EASY, MEND])
    assert (r.template, r.target_new, r.target_true) == ("The mother tongue of {} is", "English", "French")
    assert r.neighborhood_answers == ("French", "French")
    assert (e.paraphrase_prompts, e.neighborhood_answers) == (("Danielle Darrieux spoke",), ("French",))
    assert (m.target_new, m.target_true, m.neighborhood_answers) == ("University of Michigan",
                                                                    "Illinois Institute of Technology",
                                                                    ("Hugo Weaving",))
    assert m.template == "What university did {} attend?"


def test_rome_bare_request_as_apply_rome_to_model_takes_it():
    bare = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}}
    assert detect_schema(bare) == "rome"
    r, = parse_records([bare])
    assert (r.template, r.subject, r.target_new, r.target_true) == ("{} is located in the city of",
                                                                    "The Eiffel Tower", "Rome", None)
    r, = parse_records([ROME["requested_rewrite"]])
    assert (r.target_new, r.target_true, r.neighborhood_prompts) == ("English", "French", ())
    with pytest.raises(ValueError, match="request #0 \\(rome schema\\) lacks field 'target_new.str'"):
        parse_records([dict(bare, target_new={"text": "Rome"})])
    record = {k: v for k, v in ROME.items()}
    record["requested_rewrite"] = {k: v for k, v in ROME["requested_rewrite"].items() if k != "target_true"}
    with pytest.raises(ValueError, match="request #0 \\(rome schema\\) lacks field 'target_true'"):
        parse_records([record])          # a CounterFact record's neighbours need the true object


def test_load_requests_json_and_errors_name_the_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([ROME, EASY, MEND]))
    assert len(load_requests(p)) == 3 and len(load_requests(p, limit=1, offset=2)) == 1
    assert load_requests(p, limit=1, offset=2)[0].template == "What university did {} attend?"
    p.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match=f"requests file {p}: request #0: unrecognised edit-request schema"):
        load_requests(p)
    bad = dict(EASY)
    del bad["subject"]
    p.write_text(json.dumps([EASY, bad]))
    with pytest.raises(ValueError, match=f"requests file {p}: request #1 \\(easyedit schema\\) lacks field 'subject'"):
        load_requests(p)
    p.write_text(json.dumps([EASY, EASY, EASY, bad]))
    with pytest.raises(ValueError, match=f"requests file {p}: request #3 \\(easyedit schema\\) lacks field 'subject'"):
        load_requests(p, offset=2)                      # numbered as in the file
    p.write_text(json.dumps({"a": 1, "b": 2}) + "\n{broken")
    with pytest.raises(ValueError, match=f"requests file {p}: not JSON .* line 2"):
        load_requests(p)
    p.write_text(json.dumps("a string"))
    with pytest.raises(ValueError, match=f"requests file {p}: expected a JSON list"):
        load_requests(p)
    p.write_text(json.dumps([EASY]))
    with pytest.raises(ValueError, match=f"requests file {p}: no requests"):
        load_requests(p, offset=1)
    with pytest.raises(ValueError, match=f"requests file {p}: limit"):
        load_requests(p, limit=0)
    with pytest.raises(FileNotFoundError, match="requests file .*missing.json not found"):
        load_requests(tmp_path / "missing.json")


def test_load_requests_reads_json_lines(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in (ROME, EASY, MEND)) + "\n\n")
    assert [r.subject for r in load_requests(p)] == ["Danielle Darrieux", "Danielle Darrieux", "Watts Humphrey"]


def test_a_benchmark_passes_over_records_that_are_no_edit_and_says_which(tmp_path):
    from mose_fast.requests import load_benchmark
    no_answer = {**MEND, "alt": ""}                   # as records #534 and #723 of zsre_mend_train-1k.json
    p = tmp_path / "zsre.json"
    p.write_text(json.dumps([MEND, no_answer, MEND, MEND, no_answer, MEND]))
    with pytest.raises(ValueError, match="request #1: .*'target_new' is empty"):
        load_requests(p)                              # a user's own file: every record must be valid
    reqs, skipped = load_benchmark(p, limit=3)
    assert [r.case_id for r in reqs] == [0, 2, 3]     # MEND records are numbered by their place in the file
    assert [i for i, _ in skipped] == [1] and "'target_new' is empty" in skipped[0][1]
    reqs, skipped = load_benchmark(p, limit=2, offset=3)
    assert [r.case_id for r in reqs] == [3, 5] and [i for i, _ in skipped] == [4]
    assert [r.case_id for r in load_benchmark(p)[0]] == [0, 2, 3, 5]
    with pytest.raises(ValueError, match=f"requests file {p}: 4 usable requests from record 0 on, 5 asked "
                                         r"\(2 passed over: #1: .*; #4: "):
        load_benchmark(p, limit=5)
    assert [r.case_id for r in load_requests(p, limit=1)] == [0]
