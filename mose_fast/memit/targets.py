"""Target vectors ``z`` (MEMIT ``compute_z``).

For each request, a vector δ is added to the residual stream after block ``layer`` (the last
edited layer) at the subject's last token of every rewrite prompt and optimised with Adam for

    NLL(target_new | context + prompt)  +  kl_factor · KL(p(· | "{subject} is a") ‖ p₀)
    + v_weight_decay · ‖δ‖ / ‖h₀‖²

with δ projected back into the ball ‖δ‖ ≤ clamp_norm_factor · ‖h₀‖ after each step.  The target
is ``z = h₀ + δ`` where ``h₀`` is the unedited residual on the bare prompt.

Each step runs only the prompts' suffixes against a key/value cache of their prefixes
(:class:`_PrefixCache`), checked once per edit against a full forward.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..hf.arch import ArchSpec
from ..config import MOSEConfig
from ..hf.hooks import edit_output
from ..requests import EditRequest
from ..hf.tokens import pad_batch, subject_last_index, target_ids

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

    runner = _PrefixCache(model, arch, layer, ids, lookup, sel_rows, sel_cols, tok)
    h0 = runner.h0[0].float().clone()
    if runner.usable:
        def selected_logits() -> torch.Tensor:
            return runner.logits(delta)
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
                    context_templates: list[list[str]], cfg: MOSEConfig, progress: bool = False) -> list[TargetResult]:
    from tqdm.auto import tqdm
    bar = tqdm(requests, desc="targets", unit="request", disable=not progress or len(requests) < 2, leave=False)
    return [compute_target(model, tok, arch, layer, r, context_templates, cfg) for r in bar]


class _PrefixCache:
    """Runs each optimisation step on the prompts' *suffixes* only.

    δ enters at the subject's last token (row i's position ``lookup[i]``), and attention is
    causal, so no position before it depends on δ.  Each prompt's prefix ``ids[i][:lookup[i]]``
    is run once (left-padded, no grad) into a key/value cache; every step then feeds only the
    suffix ``ids[i][lookup[i]:]`` (a few tokens instead of the whole templated prompt) with δ
    added at its first position after block ``layer``.  The full forward done here at δ = 0
    checks the logits at every selected position and provides h₀; a family whose cached forward
    does not reproduce them falls back to full forwards (``usable`` False).
    """

    def __init__(self, model, arch: ArchSpec, layer: int, ids: list[list[int]], lookup: list[int],
                 sel_rows: list[int], sel_cols: list[int], tok):
        self.model = model
        self.block = arch.block(model, layer)
        self.lm_head = arch.get(model, arch.lm_head)
        device = next(model.parameters()).device
        n = len(ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        P = max(lookup)
        S = max(len(x) - c for x, c in zip(ids, lookup))
        prefix = torch.full((n, P), pad, dtype=torch.long)
        prefix_mask = torch.zeros((n, P), dtype=torch.long)
        suffix = torch.full((n, S), pad, dtype=torch.long)
        suffix_mask = torch.zeros((n, S), dtype=torch.long)
        for i, (x, c) in enumerate(zip(ids, lookup)):
            if c:
                prefix[i, P - c:] = torch.tensor(x[:c])
                prefix_mask[i, P - c:] = 1
            suffix[i, :len(x) - c] = torch.tensor(x[c:])
            suffix_mask[i, :len(x) - c] = 1
        lookup_t = torch.tensor(lookup)
        self.suffix = suffix.to(device)
        self.mask = torch.cat([prefix_mask, suffix_mask], 1).to(device)
        self.positions = (torch.arange(S).unsqueeze(0) + lookup_t.unsqueeze(1)).to(device)
        self.rows = torch.tensor(sel_rows, device=device)
        self.cols = (torch.tensor(sel_cols) - lookup_t[torch.tensor(sel_rows)]).to(device)
        self.cache = None
        with torch.no_grad():
            if P:
                pre_pos = (prefix_mask.cumsum(1) - 1).clamp(min=0)
                self.cache = model(input_ids=prefix.to(device), attention_mask=prefix_mask.to(device),
                                   position_ids=pre_pos.to(device), use_cache=True).past_key_values
        # The reference full forward also yields h0 = residual after block `layer` at each
        # prompt's subject position.
        seen = {}

        def grab(hidden):
            seen["h"] = hidden[torch.arange(n, device=device), lookup_t.to(device)].detach()
            return hidden
        with torch.no_grad():
            with edit_output(self.block, grab):
                full = model(**pad_batch(tok, ids, device), use_cache=False)
            ref = full.logits[self.rows, torch.tensor(sel_cols, device=device)].float()
            mine = self._forward().float()
        self.h0 = seen["h"]
        err = float((mine - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        self.usable = bool(err < 1e-3)

    def _forward(self) -> torch.Tensor:
        # The cache is appended to by each forward: give every step its own copy of the prefix.
        cache = copy.deepcopy(self.cache) if self.cache is not None else None
        # Unembed only the positions the loss reads (a vocabulary-wide GEMM per position).
        handle = self.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][self.rows, self.cols],))
        try:
            out = self.model(input_ids=self.suffix, attention_mask=self.mask, position_ids=self.positions,
                             past_key_values=cache, use_cache=cache is not None)
        finally:
            handle.remove()
        return out.logits

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        def add(hidden):
            bump = torch.zeros_like(hidden)
            bump[:, 0] = delta.to(hidden.dtype)
            return hidden + bump
        with edit_output(self.block, add):
            return self._forward()
