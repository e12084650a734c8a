"""Scoring answers as continuations: logits at chosen positions only, mean-token NLL of an answer
after its prompt (the probability-comparison protocol of MEMIT's ``eval_utils_counterfact``),
whether an edit landed, and the greedy answer."""
from __future__ import annotations

import torch

from ..requests import EditRequest
from .tokens import pad_batch, prompt_ids, target_ids


def logits_at(model, batch: dict, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at (rows[i], cols[i]) only: the unembedding (a vocabulary-wide GEMM per position)
    runs on those positions instead of every position of the batch."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return model(**batch).logits[rows, cols]
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][rows, cols],))
    try:
        return model(**batch).logits
    finally:
        handle.remove()


def _answer_logits(model, tok, prompts: list[str], answers: list[str],
                   device) -> tuple[torch.Tensor, list[int], list[int]]:
    """One padded batch of prompt + " "+answer sequences: the logits that predict each answer
    token (rows stacked answer after answer), the answer tokens, and each answer's length."""
    seqs, rows, cols, labels, sizes = [], [], [], [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p, a = prompt_ids(tok, prompt), target_ids(tok, answer)
        seqs.append(p + a)
        rows += [i] * len(a)
        cols += range(len(p) - 1, len(p) - 1 + len(a))     # logits at j predict token j + 1
        labels += a
        sizes.append(len(a))
    logits = logits_at(model, pad_batch(tok, seqs, device), torch.tensor(rows, device=device),
                       torch.tensor(cols, device=device))
    return logits, labels, sizes


def by_length(tok, prompts: list[str], answers: list[str], batch_size: int) -> list[list[int]]:
    """Batches of item indices in order of prompt + answer length: a batch pads only to its own
    longest sequence (a third of the positions of unsorted batches of CounterFact prompts)."""
    lengths = [len(prompt_ids(tok, p)) + len(target_ids(tok, a)) for p, a in zip(prompts, answers)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


@torch.no_grad()
def answer_nll(model, tok, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Mean-token NLL of each answer (with a leading space) after its prompt, in batches of similar
    length (``by_length``), returned in the order given."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = next(model.parameters()).device
    out: list[float] = [0.0] * len(prompts)
    for idx in by_length(tok, prompts, answers, batch_size):
        logits, labels, sizes = _answer_logits(model, tok, [prompts[i] for i in idx], [answers[i] for i in idx], device)
        lp = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(labels), device=device),
                                                       torch.tensor(labels, device=device)]
        for i, chunk in zip(idx, lp.split(sizes)):
            out[i] = float(-chunk.mean())
    return out


def landed(model, tok, requests: list[EditRequest]) -> list[float] | None:
    """Efficacy of each request on its own prompt, P(new) > P(true), measured right after its
    edit: whether the edit landed, apart from whether later edits keep it.  None without
    ``target_true`` (zsRE-style requests)."""
    if any(r.target_true is None for r in requests):
        return None
    nll = answer_nll(model, tok, [r.text for r in requests for _ in (0, 1)],
                     [a for r in requests for a in (r.target_new, r.target_true)])
    return [float(new < true) for new, true in zip(nll[0::2], nll[1::2])]


@torch.no_grad()
def greedy_answer(model, tok, prompt: str, max_new_tokens: int = 6) -> str:
    """The model's greedy continuation (for showing before/after answers)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tok, prompt)], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
