"""The target optimisation of ``targets.py`` written plainly: one request at a time, every prompt run whole
through the whole model, ``torch.optim.Adam``.  Slow; it is the reference the tests hold the fast path to
(batched requests, prefix cache, replayed blocks, packing, per-request Adam), not a code path of the editor.

For a request: δ is added after block ``layer`` at the subject's last token of each prompt and minimises

    mean over prompts of the mean-token NLL of target_new  +  kl_factor · KL(p ‖ p at δ = 0) on "{subject} is a"
    + v_weight_decay · ‖δ‖ / ‖h₀‖²,

stopping at the first step whose target NLL ("nll") or loss ("loss") is below ``v_loss_early_stop``, δ
clamped to ‖δ‖ ≤ clamp_norm_factor · ‖h₀‖ after every step; z = h₀ + δ.
"""
from __future__ import annotations

import torch

from ..hf.arch import ArchSpec
from ..hf.hooks import capture_outputs, edit_output
from ..hf.tokens import subject_last_index, target_ids
from ..requests import EditRequest
from .prefix_cache import KL_TEMPLATE
from .targets import TargetResult


def naive_target(model, tok, arch: ArchSpec, layer: int, request: EditRequest,
                 context_templates: list[list[str]], cfg) -> TargetResult:
    device = next(model.parameters()).device
    block = arch.block(model, layer)
    target = target_ids(tok, request.target_new)
    prompts = []                                   # (ids, subject's last position) per rewrite prompt
    for context in (t for group in context_templates for t in group):
        ids, pos = subject_last_index(tok, context.replace("{}", request.template, 1), request.subject)
        prompts.append((ids + target[:-1], pos))
    kl_ids, kl_pos = subject_last_index(tok, KL_TEMPLATE, request.subject)

    def run(ids: list[int], pos: int, delta: torch.Tensor) -> torch.Tensor:
        def add(hidden: torch.Tensor) -> torch.Tensor:
            bump = torch.zeros_like(hidden)
            bump[0, pos] = delta.to(hidden.dtype)
            return hidden + bump
        with edit_output(block, add):
            return model(input_ids=torch.tensor([ids], device=device)).logits[0].float()

    with torch.no_grad(), capture_outputs({"block": block}) as seen:
        model(input_ids=torch.tensor([prompts[0][0]], device=device))
    h0 = seen["block"][0][0, prompts[0][1]].float()
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_init = None
    for step in range(cfg.v_num_grad_steps):
        nlls = []
        for ids, pos in prompts:
            log_probs = torch.log_softmax(run(ids, pos, delta), dim=-1)
            at = torch.arange(len(ids) - len(target), len(ids))      # logits at c predict token c + 1
            nlls.append(-log_probs[at, torch.tensor(target)].mean())
        nll = torch.stack(nlls).mean()
        kl_lp = torch.log_softmax(run(kl_ids, kl_pos, delta), dim=-1)[kl_pos:kl_pos + 1]
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = cfg.kl_factor * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
        loss = nll + kl + cfg.v_weight_decay * delta.norm() / h0.norm() ** 2
        measure = nll if cfg.v_stop_on == "nll" else loss
        if measure.item() < cfg.v_loss_early_stop or step == cfg.v_num_grad_steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            limit = cfg.clamp_norm_factor * h0.norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return TargetResult(z=(h0 + delta.detach()).float(), h0=h0, nll=nll.item(), steps=step + 1)
