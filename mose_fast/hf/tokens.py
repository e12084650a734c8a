"""Tokenisation with the position of the subject's last token (MEMIT's ``subject_last``)."""
from __future__ import annotations

import torch

from ..requests import fill


def subject_last_index(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template`` filled with ``subject`` and the index of the subject's last token.

    Uses the fast tokenizer's character offsets: the last token whose span starts before the end
    of the subject.  Slow tokenizers fall back to MEMIT's rule (tokenise prefix + subject).
    """
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' subject slot")
    start = template.index("{}")
    text = fill(template, subject)
    end = start + len(subject)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        idx = max((i for i, (s, e) in enumerate(offsets) if s < end and e > s), default=None)
        if idx is None:
            raise ValueError(f"subject {subject!r} produced no token in {text!r}")
        return list(ids), idx
    ids = tok(text)["input_ids"]
    n_prefix_subject = len(tok(text[:end])["input_ids"])
    return list(ids), n_prefix_subject - 1


def pad_batch(tok, id_lists: list[list[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad token id lists; positions computed on unpadded ids stay valid."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(x) for x in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for i, ids in enumerate(id_lists):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def target_ids(tok, target: str) -> list[int]:
    """Ids of the answer as it follows a prompt: with one leading space (MEMIT convention)."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def prompt_ids(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])
