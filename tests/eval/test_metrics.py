"""Metrics and scoring on hand-made models whose answers are known exactly, and the scoring
shortcuts against plain full-logits computations on tiny models."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from mose_fast.eval import general
from mose_fast.eval.metrics import CaseScores, by_age, score_cases, summarize
from mose_fast.hf.scoring import answer_nll, landed, logits_at
from mose_fast.hf.tokens import target_ids
from mose_fast.requests import EditRequest

from helpers import make_tiny_model, tiny_tokenizer


class ConstantModel(torch.nn.Module):
    """Same logits at every position: +5 on the given token ids, 0 elsewhere."""

    def __init__(self, vocab, favoured):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.logits = torch.zeros(vocab)
        self.logits[list(favoured)] = 5.0

    def forward(self, input_ids, attention_mask=None, **kw):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1).clone())


REQS = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French",
                    paraphrase_prompts=["Danielle Darrieux spoke"], neighborhood_prompts=["Léon Blum spoke"],
                    neighborhood_answers=["French"]),
        EditRequest("Apple was founded by", "Apple", "Bill Gates", target_true="Steve Jobs",
                    paraphrase_prompts=["The founder of Apple is"], neighborhood_prompts=["NeXT was founded by"],
                    neighborhood_answers=["Steve Jobs"])]


def favour(tok, answers):
    ids = set()
    for a in answers:
        ids |= set(target_ids(tok, a))
    return ids


def test_answer_nll_exact_value():
    tok = tiny_tokenizer()
    fav = favour(tok, ["French"])
    model = ConstantModel(len(tok), fav)
    got = answer_nll(model, tok, ["The mother tongue is"], ["French"])[0]
    expected = -(5.0 - math.log(len(fav) * math.exp(5.0) + (len(tok) - len(fav))))
    assert got == pytest.approx(expected, rel=1e-6)


def test_model_preferring_true_object():
    tok = tiny_tokenizer()
    model = ConstantModel(len(tok), favour(tok, ["French", "Steve Jobs"]) - favour(tok, ["English", "Bill Gates"]))
    s = summarize(score_cases(model, tok, REQS))
    assert (s["efficacy"], s["paraphrase"], s["neighborhood"], s["score"]) == (0.0, 0.0, 1.0, 0.0)


def test_model_preferring_new_object():
    tok = tiny_tokenizer()
    model = ConstantModel(len(tok), favour(tok, ["English", "Bill Gates"]) - favour(tok, ["French", "Steve Jobs"]))
    s = summarize(score_cases(model, tok, REQS))
    assert (s["efficacy"], s["paraphrase"], s["neighborhood"]) == (1.0, 1.0, 0.0)


def test_landed_is_efficacy_on_the_own_prompt():
    tok = tiny_tokenizer()
    new_fav = ConstantModel(len(tok), favour(tok, ["English", "Bill Gates"]) - favour(tok, ["French", "Steve Jobs"]))
    true_fav = ConstantModel(len(tok), favour(tok, ["French", "Steve Jobs"]) - favour(tok, ["English", "Bill Gates"]))
    assert landed(new_fav, tok, REQS) == [1.0, 1.0]
    assert landed(true_fav, tok, REQS) == [0.0, 0.0]
    assert landed(new_fav, tok, [REQS[0], EditRequest("X is", "X", "Y")]) is None     # no target_true


def test_score_is_harmonic_mean():
    from mose_fast.eval.metrics import CaseScores
    cases = [CaseScores(0, 1.0, 2.0, [1.0, 3.0], [2.0, 2.0], [1.0], [2.0])]   # eff 1, para 0.5, neigh 1
    s = summarize(cases)
    assert s["score"] == pytest.approx(3 / (1 + 2 + 1))


def test_missing_target_true_is_an_error():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="no target_true"):
        score_cases(ConstantModel(len(tok), {1}), tok, [EditRequest("X is", "X", "Y")])


def test_glue_accuracy_of_constant_answer(tmp_path):
    """A model that always says ' positive' scores the share of positive items."""
    tok = tiny_tokenizer()
    items = [{"sentence": f"film number {i} was fine", "label": int(i % 3 == 0), "idx": i} for i in range(30)]
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "sst2.json").write_text(json.dumps(items))
    pos = favour(tok, ["positive"]) - favour(tok, ["negative"])
    res = general.task_accuracy(ConstantModel(len(tok), pos), tok, tmp_path, "sst2", n=30)
    assert res["accuracy"] == pytest.approx(sum(x["label"] for x in items) / 30)
    assert set(res["predictions"]) == {1}


def test_perplexity_of_uniform_model_is_vocab_size(tmp_path):
    tok = tiny_tokenizer()
    p = tmp_path / "t.txt"
    p.write_text("The capital of France is Paris. " * 20)
    res = general.perplexity(ConstantModel(len(tok), set()), tok, p, max_tokens=100, seq_len=32)
    assert res["perplexity"] == pytest.approx(len(tok), rel=1e-5)
    assert res["tokens"] > 50


@pytest.mark.model
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_answer_nll_matches_full_logits_reference(family):
    """The unembed-only-where-read path equals the plain full-logits computation."""
    from helpers import make_tiny_model
    model, tok = make_tiny_model(family)
    prompts = ["The capital of France is", "Apple was founded by", "Rome"]
    answers = ["Paris", "Steve Jobs", "is in Italy"]
    got = answer_nll(model, tok, prompts, answers, batch_size=2)
    for p, a, g in zip(prompts, answers, got):
        ids, ans = tok(p)["input_ids"], target_ids(tok, a)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids + ans])).logits[0].double(), -1)
        ref = -sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(ans)) / len(ans)
        assert g == pytest.approx(ref, rel=1e-5)


def test_token_accuracy_protocol_on_constant_models():
    from mose_fast.eval.metrics import token_scores
    tok = tiny_tokenizer()
    # one-token answers so that a constant model's argmax is exactly known
    one = [a for a in ["Paris", "Rome", "France", "Italy", "the", "is"] if len(target_ids(tok, a)) == 1]
    assert len(one) >= 2, one
    new, true = one[0], one[1]
    reqs = [EditRequest("The capital of {} is", "X", new, target_true=true, paraphrase_prompts=["X's capital is"],
                        neighborhood_prompts=["The capital of Y is"], neighborhood_answers=[true])]
    fav_new = ConstantModel(len(tok), set(target_ids(tok, new)))
    fav_true = ConstantModel(len(tok), set(target_ids(tok, true)))
    pre = token_scores(fav_true, tok, reqs)
    assert (pre["rewrite_acc"], pre["rephrase_acc"]) == (0.0, 0.0)
    same = token_scores(fav_true, tok, reqs, locality_reference=pre["locality_predictions"])
    assert same["locality"] == 1.0
    post = token_scores(fav_new, tok, reqs, locality_reference=pre["locality_predictions"])
    assert (post["rewrite_acc"], post["rephrase_acc"], post["locality"]) == (1.0, 1.0, 0.0)


@pytest.mark.model
def test_logits_at_equals_the_full_logits_at_those_positions():
    from mose_fast.hf.tokens import pad_batch

    from helpers import make_tiny_model
    model, tok = make_tiny_model("llama")
    seqs = [tok("The capital of France is Paris")["input_ids"], tok("Rome")["input_ids"]]
    batch = pad_batch(tok, seqs, "cpu")
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([0, len(seqs[0]) - 1, len(seqs[1]) - 1])
    with torch.no_grad():
        full = model(**batch).logits
        got = logits_at(model, batch, rows, cols)
    assert got.shape == (3, full.shape[-1])
    torch.testing.assert_close(got, full[rows, cols], atol=1e-5, rtol=1e-5)


@pytest.mark.model
def test_scores_in_length_sorted_batches_are_each_items_own(tmp_path):
    """answer_nll, teacher_forced_argmax and the label scores batch items by length; each result is
    the item's own, in the order given (float64: one item at a time is the reference)."""
    from mose_fast.eval.general import label_scores
    from mose_fast.eval.metrics import teacher_forced_argmax
    from mose_fast.hf.scoring import answer_nll
    model, tok = make_tiny_model("llama")
    model.double()
    prompts = ["The capital of France is", "Paris", "The mother tongue of Danielle Darrieux is French and", "I",
               "Michael Jordan plays the sport of", "The Eiffel Tower is located in the city of"]
    answers = ["Paris", "is a city", "English", "think", "basketball", "Rome"]
    batched = answer_nll(model, tok, prompts, answers, batch_size=4)
    alone = [answer_nll(model, tok, [p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(alone, rel=1e-10, abs=1e-12)
    assert teacher_forced_argmax(model, tok, prompts, answers, batch_size=4) == \
        [teacher_forced_argmax(model, tok, [p], [a], batch_size=1)[0] for p, a in zip(prompts, answers)]
    scores = label_scores(model, tok, prompts, [" negative", " positive"], batch_size=4)
    one = torch.cat([label_scores(model, tok, [p], [" negative", " positive"], batch_size=1) for p in prompts])
    torch.testing.assert_close(scores, one, atol=1e-10, rtol=1e-10)


def _case(i: int, success: bool) -> CaseScores:
    new, true = (1.0, 2.0) if success else (2.0, 1.0)
    return CaseScores(i, new, true, [new], [true], [1.0], [2.0])


def test_by_age_splits_the_cases_by_when_they_were_edited():
    # 20 edits in 4 spans of 5; sampled cases at places 0, 3 (first span), 12 (third), 19 (fourth)
    scores = [_case(0, True), _case(3, False), _case(12, False), _case(19, True)]
    spans = by_age(scores, [0, 3, 12, 19], n_done=20, bins=4)
    assert [(b["first"], b["last"], b["n"]) for b in spans] == [(1, 5, 2), (6, 10, 0), (11, 15, 1), (16, 20, 1)]
    assert spans[0]["efficacy"] == 0.5 and spans[2]["efficacy"] == 0.0 and spans[3]["efficacy"] == 1.0
    assert spans[0]["neighborhood"] == 1.0 and "efficacy" not in spans[1]
    assert [(b["first"], b["last"]) for b in by_age([], [], 20, 4, offset=100)][0] == (101, 105)
    # uneven spans: 7 edits in 3 bins end at round(7k/3)
    assert [(b["first"], b["last"]) for b in by_age([], [], 7, 3)] == [(1, 2), (3, 5), (6, 7)]
    with pytest.raises(ValueError, match="outside"):
        by_age([_case(0, True)], [20], n_done=20, bins=4)
    with pytest.raises(ValueError, match="age bins"):
        by_age([], [], n_done=3, bins=4)
