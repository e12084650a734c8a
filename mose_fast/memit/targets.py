"""Target vectors ``z`` (MEMIT ``compute_z``), for every request of a batch at once.

For each request j a vector δ_j is added to the residual stream after block ``layer`` (the last
edited layer) at the subject's last token of each of its rewrite prompts and optimised with Adam for

    NLL(target_new_j | context + prompt_j)  +  kl_factor · KL(p(· | "{subject_j} is a") ‖ p₀)
    + v_weight_decay · ‖δ_j‖ / ‖h₀_j‖²

(the NLL: mean over the target's tokens, then over the context-templated prompts)

with δ_j projected back into the ball ‖δ_j‖ ≤ clamp_norm_factor · ‖h₀_j‖ after each step.  The
target is ``z_j = h₀_j + δ_j``, ``h₀_j`` the unedited residual on the bare prompt.

The requests share nothing but the forward pass: every step runs one padded batch holding every
active request's rewrite and KL prompts, the loss is the sum of the requests' losses (each δ_j
reaches only its own rows), and Adam keeps per-request state — so each request follows exactly the
trajectory it would follow alone.  A request whose loss (``v_stop_on`` "loss") or target NLL
("nll") falls below ``v_loss_early_stop`` stops: its rows leave the batch and its δ is frozen.

With ``target_dtype`` set (bfloat16) and a float32 model, the steps' forward runs under
``torch.autocast`` (:func:`step_precision`) on bf16 copies of the weights above ``layer``
(:func:`low_precision_weights`), and the prefixes' keys and values above ``layer`` are computed the
same way; h₀, the replayed blocks, δ, Adam and the loss stay in float32.

Each step runs only the prompts' suffixes against a key/value cache of their prefixes, and only the
blocks after ``layer`` (those below are replayed from a record at δ = 0) (``prefix_cache.PrefixCache``),
checked against a full forward when first built on a model; several rows' suffixes share one packed row where
that saves tokens, and the prefixes are computed packed the same way (``prefix_cache._Packing``).
``naive.py`` is the same optimisation written plainly, the reference the tests hold this one to.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import MOSEConfig
from ..hf.arch import ArchSpec
from ..requests import EditRequest
from .prefix_cache import PrefixCache, PromptRows

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8      # torch.optim.Adam's defaults, as MEMIT uses them


@dataclass
class TargetResult:
    z: torch.Tensor          # (d_model,) target residual at the last edited layer
    h0: torch.Tensor         # residual before optimisation
    nll: float               # final mean-token NLL of target_new over the rewrite prompts
    steps: int


def compute_targets(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
                    context_templates: list[list[str]], cfg: MOSEConfig) -> list[TargetResult]:
    """Targets of all ``requests``, optimised together in chunks of ``cfg.target_batch`` requests
    (see the module doc; a request's target does not depend on the chunk it is in)."""
    size = getattr(cfg, "target_batch", None) or len(requests)
    out: list[TargetResult] = []
    for chunk in even_chunks(len(requests), size):
        out += _optimise(model, tok, arch, layer, requests[chunk], context_templates, cfg)
    return out


def even_chunks(n: int, size: int) -> list[slice]:
    """``n`` items in as few chunks of at most ``size`` as possible, their sizes differing by at most
    one (100 at 16: seven chunks of 15 or 14, not six of 16 and one of 4)."""
    count = -(-n // size)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _optimise(model, tok, arch: ArchSpec, layer: int, requests: list[EditRequest],
              context_templates: list[list[str]], cfg: MOSEConfig) -> list[TargetResult]:
    """Targets of ``requests`` optimised in one padded batch."""
    batch = PromptRows(tok, requests, context_templates)
    low = autocast_dtype(model, cfg.target_dtype)
    runner = PrefixCache(model, arch, layer, batch, tok,
                         low_weights=low_precision_weights(model, arch, layer, low) if low is not None else None)
    first_row = [batch.row_request.index(j) for j in range(batch.n)]
    h0 = runner.h0[first_row].float()                                            # n × d
    h0_norm = h0.norm(dim=1)
    max_norm = cfg.clamp_norm_factor * h0_norm
    delta = torch.zeros_like(h0, requires_grad=True)
    m, v = torch.zeros_like(h0), torch.zeros_like(h0)
    adam_t = [0] * batch.n
    active = list(range(batch.n))
    done: dict[int, tuple[float, int]] = {}
    kl_init: dict[int, torch.Tensor] = {}
    with step_precision(model, cfg.target_dtype) as precision:
        for step in range(cfg.v_num_grad_steps):
            with precision():
                logits = runner.logits(delta)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            losses, keep = {}, []
            for j, (rows, labels, kl_row) in runner.loss_positions().items():
                lp = log_probs[rows, labels]
                nll = -lp.view(batch.n_rewrite, -1).mean(1).mean()
                kl_lp = log_probs[kl_row:kl_row + 1]
                if j not in kl_init:
                    kl_init[j] = kl_lp.detach().clone()
                kl = cfg.kl_factor * torch.nn.functional.kl_div(kl_init[j], kl_lp, log_target=True,
                                                                reduction="batchmean")
                decay = cfg.v_weight_decay * (delta[j].norm() / h0_norm[j] ** 2)
                loss = nll + kl + decay
                measure = nll if cfg.v_stop_on == "nll" else loss
                if measure.item() < cfg.v_loss_early_stop or step == cfg.v_num_grad_steps - 1:
                    done[j] = (nll.item(), step + 1)
                else:
                    losses[j] = loss
                    keep.append(j)
            if not keep:
                break
            if delta.grad is not None:
                delta.grad = None
            torch.stack(list(losses.values())).sum().backward()
            with torch.no_grad():
                _adam_step(delta, delta.grad, m, v, adam_t, keep, cfg.v_lr)
                for j in keep:
                    norm = delta[j].norm()
                    if norm > max_norm[j]:          # project into the L2 ball around h0
                        delta[j].mul_(max_norm[j] / norm)
            if len(keep) < len(active):
                runner.select(keep)
            active = keep
    z = (h0 + delta.detach()).to(torch.float32)
    return [TargetResult(z=z[j], h0=h0[j], nll=done[j][0], steps=done[j][1]) for j in range(batch.n)]


@contextmanager
def step_precision(model, dtype_name: str | None) -> Iterator:
    """A factory of the context each Adam step's forward runs in: ``torch.autocast`` to
    ``dtype_name`` for a float32 model (matrix products in it; normalisations, softmax and the
    residual stream as autocast keeps them, in float32), else nothing — a float64 model is run
    exactly, one in half precision in its own dtype.

    On the CPU, attention runs eager for as long as this context lasts: torch's CPU
    flash-attention backward in bfloat16 is several times slower than the matrix products it
    would save (docs/research.md §7), while eager attention's products autocast like any other."""
    dtype = autocast_dtype(model, dtype_name)
    if dtype is None:
        yield nullcontext
        return
    device = next(model.parameters()).device.type
    before = getattr(model.config, "_attn_implementation", None)
    switch = device == "cpu" and before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield lambda: torch.autocast(device, dtype=dtype)
    finally:
        if switch:
            model.set_attn_implementation(before)


def autocast_dtype(model, dtype_name: str | None) -> torch.dtype | None:
    """The dtype the steps' products run in under autocast: ``dtype_name`` for a float32 model, else
    None (the model's own dtype)."""
    if not dtype_name or next(model.parameters()).dtype != torch.float32:
        return None
    return getattr(torch, dtype_name)


def low_precision_weights(model, arch: ArchSpec, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies in ``dtype`` of the matrices a step multiplies by — the weights of the linear layers
    of the blocks after ``layer`` and of lm_head — by parameter name, for ``torch.func.functional_call``:
    autocast would otherwise cast each of them again at every step.  Empty where a weight is not
    materialised on a device (offloaded)."""
    from transformers.pytorch_utils import Conv1D
    out = {}
    for k in range(layer + 1, arch.num_layers(model)):
        for name, module in arch.block(model, k).named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                out[f"{arch.layers}.{k}.{name}.weight"] = module.weight
    out[f"{arch.lm_head}.weight"] = arch.get(model, arch.lm_head).weight
    if any(w.device.type == "meta" for w in out.values()):
        return {}
    return {name: w.detach().to(dtype) for name, w in out.items()}


def _adam_step(x: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: list[int],
               rows: list[int], lr: float) -> None:
    """torch.optim.Adam's update (defaults: betas 0.9/0.999, eps 1e-8, no weight decay) on the given
    rows of ``x`` only, each row with its own step count ``t[row]``."""
    b1, b2 = ADAM_BETAS
    for j in rows:
        t[j] += 1
        m[j].mul_(b1).add_(grad[j], alpha=1 - b1)
        v[j].mul_(b2).addcmul_(grad[j], grad[j], value=1 - b2)
        denom = (v[j] / (1 - b2 ** t[j])).sqrt_().add_(ADAM_EPS)
        x[j].addcdiv_(m[j], denom, value=-lr / (1 - b1 ** t[j]))


def compute_target(model, tok, arch: ArchSpec, layer: int, request: EditRequest,
                   context_templates: list[list[str]], cfg: MOSEConfig) -> TargetResult:
    """One request's target (a batch of one)."""
    return compute_targets(model, tok, arch, layer, [request], context_templates, cfg)[0]
