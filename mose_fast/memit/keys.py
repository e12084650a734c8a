"""Keys ``K_E`` (MEMIT ``compute_ks``) and block outputs at the subject's last token.

A key is the input of the FFN output projection at the subject's last token, averaged over the
context templates: first within each group of templates, then across groups (so the bare
``"{}"`` group weighs as much as all generated prefixes together, as in MEMIT).
"""
from __future__ import annotations

import torch

from ..hf.arch import ArchSpec
from ..hf.hooks import capture_inputs, capture_outputs, run_until
from ..requests import EditRequest
from ..hf.tokens import pad_batch, subject_last_index


@torch.no_grad()
def generate_context_templates(model, tok, prefixes=("The", "Therefore", "Because", "I", "You"),
                               length: int = 10, seed: int = 0) -> list[list[str]]:
    """``[["{}"], ["<generated text>. {}", ...]]``: ROME/MEMIT's templates, sampled with top-k 5
    from the model itself under a fixed seed, so the same model and seed give the same templates."""
    templates = ["{}"]
    if prefixes and length > 0:
        device = next(model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for prefix in prefixes:
            ids = torch.tensor([tok(prefix)["input_ids"]], device=device)
            for _ in range(length):   # top-k sampling by hand: reproducible with our own generator
                logits = model(input_ids=ids).logits[0, -1].float().cpu()
                top = logits.topk(5)
                pick = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
                ids = torch.cat([ids, pick.view(1, 1).to(device)], dim=1)
            text = tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            templates.append(text.strip() + ". {}")
    groups = [["{}"]]
    if len(templates) > 1:
        groups.append(templates[1:])
    return groups


def _subject_batch(tok, requests: list[EditRequest], templates: list[str]):
    ids, positions = [], []
    for req in requests:
        for t in templates:
            i, p = subject_last_index(tok, t.replace("{}", req.template, 1), req.subject)
            ids.append(i)
            positions.append(p)
    return ids, positions


def template_weights(context_templates: list[list[str]]) -> torch.Tensor:
    """Each template's weight in the mean key (float64, sums to 1): 1/(n_groups·len(group))."""
    return torch.cat([torch.full((len(g),), 1.0 / (len(context_templates) * len(g)), dtype=torch.float64)
                      for g in context_templates])


@torch.no_grad()
def compute_template_keys(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                          context_templates: list[list[str]]) -> torch.Tensor:
    """The key of every request in every template, (n_requests × n_templates × d_in) in the model's
    dtype, templates in the order of the flattened groups (weights: ``template_weights``)."""
    flat = [t for group in context_templates for t in group]
    ids, positions = _subject_batch(tok, requests, flat)
    device = next(model.parameters()).device
    module = arch.mlp_out_module(model, layer)
    with capture_inputs({"k": module}) as seen:
        run_until(model, arch.block(model, layer), **pad_batch(tok, ids, device))
    inputs = seen["k"][0]
    rows = inputs[torch.arange(len(ids), device=device), torch.tensor(positions, device=device)]
    return rows.view(len(requests), len(flat), -1)


@torch.no_grad()
def keys_and_outputs(model, tok, arch: ArchSpec, layer: int, out_layer: int, requests: list[EditRequest],
                     context_templates: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over every request in every template (stopped after block ``out_layer``):
    ``(K_E, h)`` — MEMIT's mean key at ``layer`` (n × d_in) and the residual stream after block
    ``out_layer`` at the subject's last token of each bare prompt (n × d_model).

    The first template is the bare prompt ``"{}"`` (``generate_context_templates``), so its rows are
    exactly the prompts ``block_outputs_at_subject`` runs."""
    flat = [t for group in context_templates for t in group]
    if flat[0] != "{}":
        raise ValueError(f"the first context template must be the bare prompt '{{}}', got {flat[0]!r}")
    if out_layer < layer:
        raise ValueError(f"out_layer {out_layer} precedes the key layer {layer}")
    ids, positions = _subject_batch(tok, requests, flat)
    device = next(model.parameters()).device
    block = arch.block(model, out_layer)
    with capture_inputs({"k": arch.mlp_out_module(model, layer)}) as keys, capture_outputs({"h": block}) as outs:
        run_until(model, block, **pad_batch(tok, ids, device))
    k_in, h = keys["k"][0], outs["h"][0]
    rows = torch.arange(len(ids), device=k_in.device)
    cols = torch.tensor(positions, device=k_in.device)
    K = mean_key(k_in[rows, cols].view(len(requests), len(flat), -1), context_templates)
    bare = torch.arange(0, len(ids), len(flat), device=h.device)
    return K, h[bare, torch.tensor(positions, device=h.device)[bare]]


@torch.no_grad()
def compute_keys(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                 context_templates: list[list[str]]) -> torch.Tensor:
    """``K_E`` as an (n_requests × d_in) tensor in the model's dtype."""
    rows = compute_template_keys(model, tok, arch, layer, requests, context_templates)
    return mean_key(rows, context_templates)


def mean_key(rows: torch.Tensor, context_templates: list[list[str]]) -> torch.Tensor:
    """MEMIT's key from the per-template keys: the mean within each group, then across groups."""
    start, group_means = 0, []
    for group in context_templates:
        group_means.append(rows[:, start:start + len(group)].mean(1))
        start += len(group)
    return torch.stack(group_means, 1).mean(1)


@torch.no_grad()
def block_outputs_at_subject(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest]) -> torch.Tensor:
    """Residual stream after block ``layer`` at the subject's last token of each bare prompt."""
    ids, positions = _subject_batch(tok, requests, ["{}"])
    device = next(model.parameters()).device
    block = arch.block(model, layer)
    with capture_outputs({"h": block}) as seen:
        run_until(model, block, **pad_batch(tok, ids, device))
    hidden = seen["h"][0]
    return hidden[torch.arange(len(ids), device=device), torch.tensor(positions, device=device)]
