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
from .hooks import _hidden, edit_output
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
    rows = torch.arange(len(ids), device=device)
    cols = torch.tensor(lookup, device=device)

    # Logits are needed only where the loss reads them: the target positions of the rewrite
    # prompts and the subject position of the KL prompt.
    sel_rows, sel_cols = [], []
    for b in range(n_rewrite):
        end = len(ids[b])
        sel_rows += [b] * len(tgt)
        sel_cols += list(range(end - len(tgt), end))   # logits at j predict token j + 1
    sel_rows.append(n_rewrite)
    sel_cols.append(lookup[n_rewrite])
    sel_rows_t = torch.tensor(sel_rows, device=device)
    sel_cols_t = torch.tensor(sel_cols, device=device)
    sel_labels = torch.tensor(tgt * n_rewrite, device=device)

    d_model = model.config.hidden_size
    delta = torch.zeros(d_model, dtype=torch.float32, device=device, requires_grad=True)

    def bump(hidden: torch.Tensor) -> torch.Tensor:
        add = torch.zeros_like(hidden)
        add[rows, cols] = delta.to(hidden.dtype)
        return hidden + add

    tail = _Tail(model, arch, layer, batch)
    h0 = tail.h_layer[0, lookup[0]].float().clone()
    if tail.usable:
        def selected_logits() -> torch.Tensor:
            return tail.logits_at(bump(tail.h_layer), sel_rows_t, sel_cols_t)
    else:
        block = arch.block(model, layer)

        def selected_logits() -> torch.Tensor:
            with edit_output(block, bump):
                return model(**batch, use_cache=False).logits[sel_rows_t, sel_cols_t]

    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    kl_init = None
    nll_value, steps = float("nan"), 0
    n_target = n_rewrite * len(tgt)
    for step in range(cfg.v_num_grad_steps):
        opt.zero_grad()
        log_probs = torch.log_softmax(selected_logits().float(), dim=-1)
        token_lp = log_probs[torch.arange(n_target, device=device), sel_labels]
        nll = -token_lp.view(n_rewrite, len(tgt)).sum(1).div(len(tgt)).mean()
        kl_lp = log_probs[n_target:]
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


class _Tail:
    """The blocks after ``layer``, re-run on their own.

    δ enters after block ``layer``, so nothing before it depends on δ: one full forward records
    the output of block ``layer`` and the arguments every later block was called with (masks,
    rotary embeddings, ...), and each optimisation step then runs only the later blocks, the
    final norm and the unembedding at the selected positions.  The same forward's logits check
    the tail once (δ = 0); a family whose tail does not reproduce them (extra logit processing,
    say) falls back to full forwards.
    """

    def __init__(self, model, arch: ArchSpec, layer: int, batch: dict):
        self.blocks = arch.blocks(model)
        self.layer = layer
        self.ln_f = arch.get(model, arch.ln_f)
        self.lm_head = arch.get(model, arch.lm_head)
        self.calls: dict[int, tuple] = {}
        seen = {}
        handles = [self.blocks[layer].register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("h", _hidden(out).detach()))]
        for i in range(layer + 1, len(self.blocks)):
            def pre(_m, args, kwargs, _i=i):
                self.calls[_i] = (args, kwargs)
            handles.append(self.blocks[i].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.no_grad():
                full_logits = model(**batch, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.h_layer = seen["h"]
        rows = torch.arange(full_logits.shape[0], device=full_logits.device)
        last = batch["attention_mask"].sum(1) - 1
        with torch.no_grad():
            mine = self.logits_at(self.h_layer, rows, last)
        ref = full_logits[rows, last]
        err = float((mine.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
        self.usable = err < 1e-3

    def logits_at(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        h = hidden
        for i in range(self.layer + 1, len(self.blocks)):
            args, kwargs = self.calls[i]
            if args:
                out = self.blocks[i](h, *args[1:], **kwargs)
            else:
                out = self.blocks[i](**{**kwargs, "hidden_states": h})
            h = _hidden(out)
        return self.lm_head(self.ln_f(h[rows, cols]))
