"""Edit metrics, probability-comparison protocol (MEMIT ``eval_utils_counterfact``).

Every answer is scored by its mean-token NLL as a continuation of the prompt, with one leading
space (``" " + answer``).  Efficacy on the rewrite prompt is P(new) > P(true), i.e.
NLL(new) < NLL(true); paraphrase success the same on paraphrases; neighbourhood success is
P(true) > P(new) on the neighbourhood prompts.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..hf.scoring import _answer_logits, answer_nll, by_length
from ..hf.tokens import target_ids
from ..requests import EditRequest


@dataclass
class CaseScores:
    case_id: object
    rewrite_nll_new: float
    rewrite_nll_true: float
    paraphrase_nll_new: list[float]
    paraphrase_nll_true: list[float]
    neighborhood_nll_true: list[float]
    neighborhood_nll_new: list[float]

    @property
    def efficacy(self) -> float:
        return float(self.rewrite_nll_new < self.rewrite_nll_true)

    @property
    def paraphrase(self) -> float | None:
        pairs = list(zip(self.paraphrase_nll_new, self.paraphrase_nll_true))
        return statistics.mean(float(n < t) for n, t in pairs) if pairs else None

    @property
    def neighborhood(self) -> float | None:
        pairs = list(zip(self.neighborhood_nll_true, self.neighborhood_nll_new))
        return statistics.mean(float(t < n) for t, n in pairs) if pairs else None


def score_cases(model, tok, requests: list[EditRequest], batch_size: int = 32) -> list[CaseScores]:
    """Probability-comparison scores of every request (needs ``target_true``)."""
    prompts, answers, index = [], [], []
    for i, r in enumerate(requests):
        if r.target_true is None:
            raise ValueError(f"request #{i} has no target_true; the probability protocol compares new vs true")
        items = [("rw_new", r.text, r.target_new), ("rw_true", r.text, r.target_true)]
        items += [("pa_new", p, r.target_new) for p in r.paraphrase_prompts]
        items += [("pa_true", p, r.target_true) for p in r.paraphrase_prompts]
        answers_true = r.neighborhood_answers or [r.target_true] * len(r.neighborhood_prompts)
        items += [("nb_true", p, a) for p, a in zip(r.neighborhood_prompts, answers_true)]
        items += [("nb_new", p, r.target_new) for p in r.neighborhood_prompts]
        for kind, p, a in items:
            prompts.append(p)
            answers.append(a)
            index.append((i, kind))
    nll = answer_nll(model, tok, prompts, answers, batch_size)
    buckets: list[dict[str, list[float]]] = [dict() for _ in requests]
    for (i, kind), v in zip(index, nll):
        buckets[i].setdefault(kind, []).append(v)
    return [CaseScores(case_id=r.case_id, rewrite_nll_new=b["rw_new"][0], rewrite_nll_true=b["rw_true"][0],
                       paraphrase_nll_new=b.get("pa_new", []), paraphrase_nll_true=b.get("pa_true", []),
                       neighborhood_nll_true=b.get("nb_true", []), neighborhood_nll_new=b.get("nb_new", []))
            for r, b in zip(requests, buckets)]


def summarize(scores: list[CaseScores]) -> dict[str, float]:
    """Means over cases; Score = harmonic mean of efficacy, paraphrase and neighbourhood."""
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else float("nan")
    eff = mean(s.efficacy for s in scores)
    par = mean(s.paraphrase for s in scores)
    nei = mean(s.neighborhood for s in scores)
    parts = [eff, par, nei]
    score = statistics.harmonic_mean(parts) if all(p == p and p > 0 for p in parts) else 0.0
    return {"efficacy": eff, "paraphrase": par, "neighborhood": nei, "score": score,
            "rewrite_nll_new": mean(s.rewrite_nll_new for s in scores),
            "neighborhood_nll_true": mean(mean(s.neighborhood_nll_true) for s in scores if s.neighborhood_nll_true),
            "n": len(scores)}


AGE_BINS = 10


def by_age(scores: list[CaseScores], positions: list[int], n_done: int, bins: int = AGE_BINS,
           offset: int = 0) -> list[dict]:
    """The scores of the cases edited at ``positions`` (0-based places in the run's order of edits)
    split by when they were edited: ``bins`` equal spans of the first ``n_done`` edits, oldest first,
    each with the edits it spans (``first``/``last``, 1-based, plus ``offset``: edits made before the
    first of them) and ``summarize`` of its cases (``n`` 0 and no metrics where the sample has none
    there).  A decay with age shows as efficacy falling from the last span to the first."""
    if len(scores) != len(positions):
        raise ValueError(f"{len(scores)} scores for {len(positions)} positions")
    if not 0 < bins <= n_done:
        raise ValueError(f"{bins} age bins for {n_done} edits")
    edges = [round(k * n_done / bins) for k in range(bins + 1)]
    spans: list[list[CaseScores]] = [[] for _ in range(bins)]
    for s, pos in zip(scores, positions):
        if not 0 <= pos < n_done:
            raise ValueError(f"position {pos} outside the {n_done} edits")
        spans[next(k for k in range(bins) if pos < edges[k + 1])].append(s)
    return [{"first": offset + edges[k] + 1, "last": offset + edges[k + 1],
             **(summarize(cases) if cases else {"n": 0})}
            for k, cases in enumerate(spans)]


# --- token-accuracy protocol (EasyEdit; MEMIT's zsRE metric) ------------------------------------

@torch.no_grad()
def teacher_forced_argmax(model, tok, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[list[int]]:
    """For each (prompt, answer): the model's argmax token at every answer position, with the
    answer's own tokens fed in (teacher forcing)."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    for idx in by_length(tok, prompts, answers, batch_size):
        logits, _, sizes = _answer_logits(model, tok, [prompts[i] for i in idx], [answers[i] for i in idx], device)
        for i, chunk in zip(idx, logits.argmax(-1).split(sizes)):
            out[i] = chunk.tolist()
    return out


def locality_items(requests: list[EditRequest]) -> tuple[list[str], list[str]]:
    prompts, answers = [], []
    for r in requests:
        answers_true = r.neighborhood_answers or [r.target_true or r.target_new] * len(r.neighborhood_prompts)
        prompts += list(r.neighborhood_prompts)
        answers += list(answers_true)
    return prompts, answers


def token_scores(model, tok, requests: list[EditRequest], locality_reference: list[list[int]] | None = None) -> dict:
    """Token-accuracy protocol: rewrite / rephrase accuracy of target_new's tokens under teacher
    forcing; locality = share of locality-answer positions whose argmax equals the reference
    (pre-edit) argmax.  Returns the means and this model's locality predictions."""
    def accuracy(prompts, answers):
        preds = teacher_forced_argmax(model, tok, prompts, answers)
        accs = [statistics.mean(float(p == t) for p, t in zip(pr, target_ids(tok, a)))
                for pr, a in zip(preds, answers)]
        return statistics.mean(accs) if accs else float("nan")
    rewrite = accuracy([r.text for r in requests], [r.target_new for r in requests])
    para_p = [p for r in requests for p in r.paraphrase_prompts]
    para_a = [r.target_new for r in requests for _ in r.paraphrase_prompts]
    rephrase = accuracy(para_p, para_a) if para_p else float("nan")
    loc_p, loc_a = locality_items(requests)
    loc_pred = teacher_forced_argmax(model, tok, loc_p, loc_a) if loc_p else []
    locality = float("nan")
    if locality_reference is not None and loc_pred:
        ref = locality_reference[:len(loc_pred)]
        locality = statistics.mean(statistics.mean(float(a == b) for a, b in zip(p, q)) for p, q in zip(loc_pred, ref))
    return {"rewrite_acc": rewrite, "rephrase_acc": rephrase, "locality": locality, "n": len(requests),
            "locality_predictions": loc_pred}
