"""Target vectors ``z`` (MEMIT ``compute_z``).

For each request, a vector δ is added to the residual stream after block ``layer`` (the last
edited layer) at the subject's last token of every rewrite prompt and optimised with Adam for

    NLL(target_new | context + prompt)  +  kl_factor · KL(p(· | "{subject} is a") ‖ p₀)
    + v_weight_decay · ‖δ‖ / ‖h₀‖²

with δ projected back into the ball ‖δ‖ ≤ clamp_norm_factor · ‖h₀‖ after each step.  The target
is ``z = h₀ + δ`` where ``h₀`` is the unedited residual on the bare prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import ArchSpec
from .config import MOSEConfig
from .hooks import edit_output
from .requests import EditRequest
from .tokens import pad_batch, subject_last_index, target_ids

KL_TEMPLATE = "{} is a"


@dataclass
class TargetResult:
    z: torch.Tensor          # (d_model,) target residual at the last edited layer
    h0: torch.Tensor         # residual before optimisation
    nll: float               # final mean-token NLL of target_new over the rewrite prompts
    steps: int


def compute_target(model, tok, arch: ArchSpec, layer: int, request: EditRequest,
                   context_templates: list[list[str]], cfg: MOSEConfig) -> TargetResult:
    device = next(model.parameters()).device
    tgt = target_ids(tok, request.target_new)
    flat = [t for group in context_templates for t in group]

    ids, lookup = [], []
    for t in flat:                     # rewrite prompts: context + prompt + target[:-1]
        i, p = subject_last_index(tok, t.replace("{}", request.template, 1), request.subject)
        ids.append(i + tgt[:-1])
        lookup.append(p)
    n_rewrite = len(ids)
    i, p = subject_last_index(tok, KL_TEMPLATE, request.subject)   # essence / KL prompt
    ids.append(i)
    lookup.append(p)

    batch = pad_batch(tok, ids, device)
    # labels[b, j] = token predicted by the logits at position j
    labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long, device=device)
    for b in range(n_rewrite):
        end = len(ids[b])
        labels[b, end - len(tgt):end] = torch.tensor(tgt, device=device)
    label_mask = labels != -100
    rows = torch.arange(len(ids), device=device)
    cols = torch.tensor(lookup, device=device)

    block = arch.block(model, layer)
    d_model = model.config.hidden_size
    delta = torch.zeros(d_model, dtype=torch.float32, device=device, requires_grad=True)
    h0 = None

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal h0
        if h0 is None:
            h0 = hidden[0, lookup[0]].detach().float().clone()
        bump = torch.zeros_like(hidden)
        bump[rows, cols] = delta.to(hidden.dtype)
        return hidden + bump

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_init = None
    nll_value, steps = float("nan"), 0
    with edit_output(block, add_delta):
        for step in range(cfg.v_num_grad_steps):
            opt.zero_grad()
            logits = model(**batch).logits.float()
            log_probs = torch.log_softmax(logits[:n_rewrite], dim=-1)
            token_lp = log_probs.gather(2, labels[:n_rewrite].clamp(min=0).unsqueeze(2)).squeeze(2)
            nll_each = -(token_lp * label_mask[:n_rewrite]).sum(1) / len(tgt)
            nll = nll_each.mean()
            kl_lp = torch.log_softmax(logits[n_rewrite:][torch.arange(1), cols[n_rewrite:]], dim=-1)
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = cfg.kl_factor * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            decay = cfg.v_weight_decay * (delta.norm() / h0.norm() ** 2)
            loss = nll + kl + decay
            nll_value, steps = nll.item(), step + 1
            if loss.item() < cfg.v_loss_early_stop or step == cfg.v_num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():      # project into the L2 ball around h0
                max_norm = cfg.clamp_norm_factor * h0.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    z = (h0 + delta.detach()).to(torch.float32)
    return TargetResult(z=z, h0=h0, nll=nll_value, steps=steps)


def compute_targets(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                    context_templates: list[list[str]], cfg: MOSEConfig) -> list[TargetResult]:
    return [compute_target(model, tok, arch, layer, r, context_templates, cfg) for r in requests]
