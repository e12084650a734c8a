"""General capability: zero-shot label-likelihood accuracy (GLUE subsets, MMLU) and perplexity.

Each item is scored by comparing the log-likelihood of every label as the continuation of its
prompt (mean over the label's tokens; one forward per item when every label is one token).
Data are JSON files read from a path (``glue/*.json`` under the data folder); nothing is
unpickled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..hf.scoring import answer_nll, logits_at
from ..hf.tokens import pad_batch, prompt_ids, target_ids

# task → (prompt builder, label strings in label-id order)
TASKS = {
    "sst2": (lambda x: f"Review: {x['sentence']}\nSentiment:", [" negative", " positive"]),
    "mrpc": (lambda x: f"Sentence 1: {x['sentence1']}\nSentence 2: {x['sentence2']}\n"
                       "Question: Do both sentences mean the same thing?\nAnswer:", [" No", " Yes"]),
    "cola": (lambda x: f"Sentence: {x['sentence']}\nQuestion: Is this sentence grammatically acceptable?\nAnswer:",
             [" No", " Yes"]),
    "rte": (lambda x: f"{x['sentence1']}\nQuestion: {x['sentence2']} True or False?\nAnswer:", [" True", " False"]),
    "mmlu": (lambda x: f"{x['question']}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", x["choices"]))
             + "Answer:", [" A", " B", " C", " D"]),
}


def load_task(data_dir: str | Path, task: str, n: int | None = None) -> list[dict]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    path = Path(data_dir) / "glue" / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (set --data-dir or MOSE_DATA_DIR)")
    items = json.loads(path.read_text())
    return items[:n] if n is not None else items


def _label_of(item: dict, task: str) -> int:
    return int(item["answer"] if task == "mmlu" else item["label"])


@torch.no_grad()
def label_scores(model, tok, prompts: list[str], labels: list[str], batch_size: int = 16) -> torch.Tensor:
    """(n_prompts × n_labels) log-likelihood of each label after each prompt."""
    label_ids = [target_ids(tok, l.strip()) if l.startswith(" ") else tok(l, add_special_tokens=False)["input_ids"]
                 for l in labels]
    device = next(model.parameters()).device
    if all(len(ids) == 1 for ids in label_ids):
        first = torch.tensor([ids[0] for ids in label_ids], device=device)
        all_seqs = [prompt_ids(tok, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(all_seqs[i]))    # batches of similar length
        out = torch.empty(len(prompts), len(labels))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            seqs = [all_seqs[i] for i in idx]
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            logits = logits_at(model, pad_batch(tok, seqs, device), torch.arange(len(seqs), device=device), last)
            lp = torch.log_softmax(logits.float(), dim=-1)
            out[torch.tensor(idx)] = lp[:, first].cpu()
        return out
    nll = answer_nll(model, tok, [p for p in prompts for _ in labels], [l.strip() for _ in prompts for l in labels],
                     batch_size)
    return -torch.tensor(nll).view(len(prompts), len(labels))


def task_accuracy(model, tok, data_dir: str | Path, task: str, n: int | None = 200) -> dict:
    """Zero-shot accuracy of ``task`` on its first ``n`` items, plus the per-item predictions."""
    build, labels = TASKS[task]
    items = load_task(data_dir, task, n)
    scores = label_scores(model, tok, [build(x) for x in items], labels)
    pred = scores.argmax(1).tolist()
    gold = [_label_of(x, task) for x in items]
    return {"task": task, "n": len(items), "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(items),
            "predictions": pred}


@torch.no_grad()
def perplexity(model, tok, text_path: str | Path, max_tokens: int = 20_000, seq_len: int = 512,
               batch_size: int = 4) -> dict:
    """Perplexity over the first ``max_tokens`` tokens of a text file, in non-overlapping windows."""
    text = Path(text_path).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens + 1]
    if len(ids) < 2:
        raise ValueError(f"{text_path} has too little text for perplexity")
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        batch = pad_batch(tok, chunk, device)
        logits = model(**batch).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        nxt = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].bool()
        tok_lp = lp.gather(2, nxt.unsqueeze(2)).squeeze(2)
        total += float(-(tok_lp * mask).sum())
        count += int(mask.sum())
    return {"perplexity": math.exp(total / count), "tokens": count}
