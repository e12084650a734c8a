"""MOSEEditor: batch and sequential edits, journal, exact undo, all-or-nothing semantics.

One edit (a batch of requests), MEMIT's multi-layer schedule with the configured rule's update:

    z       = target residual after the last edited layer           (memit/targets.py)
    for layer l in layers (first to last), on the model as already edited:
        K_E   = keys at l;  h = residual after the last layer        (memit/keys.py, one forward)
        resid = (z − h) / (layers left)
        rule.update(l, W_l, K_E, resid)                              W_l changes in place

The rules change only weights during an edit; their state takes the edit in ``commit`` once every
layer is done (and, with ``land_retries``, once the edit is kept).  So an edit that raises anywhere
is undone by putting the weights back — from host copies taken before the first write — bit for
bit, and the same copies make ``undo`` exact.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .config import MOSEConfig
from .hf.arch import ArchSpec, resolve_arch
from .memit.keys import block_outputs_at_subject, generate_context_templates, keys_and_outputs
from .memit.stats import model_fingerprint, statistics_corpus, key_second_moments
from .memit.targets import compute_targets
from .requests import EditRequest
from .rules import make_rule
from .rules.mose import check_edit_weights


@dataclass
class LayerRecord:
    layer: int
    objective: float            # the rule's objective at its solution (MOSE: Procrustes)
    objective_identity: float   # ... with no update
    orth_error: float           # ‖RᵀR − I‖_F (solve dtype); nan for additive rules
    weight_norm_before: float   # ‖W‖_F
    weight_norm_after: float
    seconds_keys: float
    seconds_solve: float
    seconds_apply: float
    attempt: int = 0            # which solve of the edit (MOSEConfig.land_retries)


@dataclass
class EditRecord:
    index: int
    case_ids: list
    layers: list[LayerRecord] = field(default_factory=list)
    target_nll: list[float] = field(default_factory=list)   # NLL of target_new after optimising δ
    # ‖z − h‖ / ‖z − h_before‖ per request at the last edited layer's output after the edit: the
    # share of the residual the edit left unmet (0 = the target z reached; 1 = nothing moved)
    target_unmet: list[float] = field(default_factory=list)
    attempts: int = 1               # solves of this edit (1 + retries)
    edit_weights: list[float] | None = None   # per-request edit-term weights of the kept solve
    seconds_targets: float = 0.0
    seconds_total: float = 0.0      # this edit, excluding one-time setup
    seconds_setup: float = 0.0      # C0 statistics, rule state, context templates (first edit)

    @property
    def seconds(self) -> dict[str, float]:
        return {"targets": self.seconds_targets,
                "keys": sum(l.seconds_keys for l in self.layers),
                "solve": sum(l.seconds_solve for l in self.layers),
                "apply": sum(l.seconds_apply for l in self.layers),
                "total": self.seconds_total}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = self.seconds
        return d


@torch.no_grad()
def spectrum(W: torch.Tensor) -> dict[str, float]:
    """‖W‖_F, σ_max, σ_min and κ₂ of a matrix (float64)."""
    s = torch.linalg.svdvals(W.to(torch.float64))
    return {"fro": float(s.pow(2).sum().sqrt()), "sigma_max": float(s[0]), "sigma_min": float(s[-1]),
            "kappa": float(s[0] / s[-1])}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy in host memory (pinned when it comes from a GPU, so the copy back is fast)."""
    if t.device.type == "cpu":
        return t.detach().clone()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(t.detach())
    return out


@dataclass
class _Kept:
    """What undo() needs of one edit: the weights before it and the rule's records."""
    index: int
    weights: dict[int, torch.Tensor]
    records: dict[int, object]


class MOSEEditor:
    """Edits a causal LM in place with the rule ``config`` names (default: the ``mose`` preset).

    ``second_moments`` ({layer: C0}) skips the statistics; ``data_dir`` is where the statistics
    corpus (WikiText-2) is looked for when ``config.stats_corpus`` is not set."""

    def __init__(self, model, tok, config: MOSEConfig | None = None, arch: ArchSpec | dict | None = None,
                 second_moments: dict[int, torch.Tensor] | None = None, progress: bool = True,
                 data_dir: str | Path | None = None):
        self.model, self.tok = model, tok
        self.arch = resolve_arch(model, arch)
        self.cfg = config or MOSEConfig.preset("mose", getattr(model.config, "model_type", None))
        self.cfg.validate()
        self.cfg.validate_for_model(self.arch.num_layers(model))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.progress = progress
        self.data_dir = data_dir
        self.rule = make_rule(self.cfg)
        self._second_moments = dict(second_moments) if second_moments is not None else None
        self._templates: list[list[str]] | None = None
        self._corpus = None
        self._master: dict[int, torch.Tensor] = {}         # float32 copies of low-precision weights
        self._prepared: set[int] = set()
        self._undo: deque[_Kept] = deque(maxlen=self.cfg.undo_history or None)
        self.records: list[EditRecord] = []
        self.journal: list[dict] = []                      # every edit and undo, in order
        self.n_edits = 0

    # --- lazily built state -------------------------------------------------------------------
    def statistics_corpus(self):
        """The corpus C0 is computed over: the configured file, WikiText-2 in the data folder, or
        (neither present) text the model writes itself."""
        if self._corpus is None:
            self._corpus = statistics_corpus(self.cfg.stats_corpus, self.data_dir, self.model, self.tok,
                                             self.cfg.seed, self.cfg.stats_tokens, self.cfg.stats_cache_dir,
                                             self.progress)
        return self._corpus

    @property
    def statistics_corpus_name(self) -> str | None:
        """The statistics corpus in words (None until the statistics are computed)."""
        if self._corpus is None:
            return "given by the caller" if self._prepared else None
        if isinstance(self._corpus, str):
            return self._corpus
        return f"generated by the model ({len(self._corpus)} texts, seed {self.cfg.seed})"

    def second_moments(self) -> dict[int, torch.Tensor]:
        need = [l for l in self.cfg.layers if l not in self._prepared]
        if self._second_moments is None or any(l not in self._second_moments for l in need):
            self._second_moments = key_second_moments(
                self.model, self.tok, self.arch, need, self.statistics_corpus(), self.cfg.stats_tokens,
                self.cfg.stats_seq_len, self.cfg.stats_batch_size, self.cfg.stats_cache_dir, self.progress)
        return self._second_moments

    def context_templates(self) -> list[list[str]]:
        if self._templates is None:
            self._templates = generate_context_templates(
                self.model, self.tok, self.cfg.context_template_prefixes, self.cfg.context_template_length,
                self.cfg.seed)
        return self._templates

    def weight(self, layer: int) -> torch.Tensor:
        """The matrix the rule acts on: the float32 master for bf16/fp16 weights, else the
        parameter itself (as a d_out × d_in view)."""
        return self._master.get(layer, self.arch.weight_view(self.model, layer))

    def prepare(self) -> None:
        """Statistics, the rule's per-layer state and the context templates (done by the first edit)."""
        need = [l for l in self.cfg.layers if l not in self._prepared]
        if need:
            C0 = self.second_moments()
            for l in need:
                W = self.arch.weight_view(self.model, l)
                if self.cfg.master_weights and W.dtype in (torch.bfloat16, torch.float16) and l not in self._master:
                    # rounding W to 8 mantissa bits after every rotation would random-walk the weights;
                    # a float32 master keeps the error to one rounding of the exact product
                    self._master[l] = W.float()
                self.rule.prepare(l, self.weight(l), C0.pop(l))
                self._prepared.add(l)
            self._second_moments = None     # the rule keeps what it needs of C0
        self.context_templates()

    # --- editing -------------------------------------------------------------------------------
    def validate(self, requests: Iterable[EditRequest] | EditRequest) -> list[EditRequest]:
        requests = [requests] if isinstance(requests, EditRequest) else list(requests)
        if not requests:
            raise ValueError("no edit requests given")
        for i, r in enumerate(requests):
            if not isinstance(r, EditRequest):
                raise ValueError(f"request #{i} is a {type(r).__name__}, expected EditRequest")
            r.validate_tokens(self.tok)
        return requests

    def edit(self, requests: Iterable[EditRequest] | EditRequest,
             edit_weights: Iterable[float] | None = None) -> EditRecord:
        """Apply one batch edit (all requests together).  All-or-nothing.

        ``edit_weights`` (MOSE rules): one weight > 0 per request for its edit term (default all
        1); ``MOSEConfig.land_retries`` raises the weights of requests that did not land."""
        requests = self.validate(requests)
        if edit_weights is not None:
            if not self.rule.supports_edit_weights:
                raise ValueError(f"edit_weights need a MOSE rule; this editor's rule is {self.cfg.method!r}")
            edit_weights = check_edit_weights(edit_weights, len(requests))
        t_setup = time.perf_counter()
        self.prepare()
        templates = self.context_templates()
        seconds_setup = time.perf_counter() - t_setup
        t_start = time.perf_counter()
        layers = self.cfg.layers
        before = {l: _host_copy(self.weight(l)) for l in layers}
        was_training = self.model.training
        grad_flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval().requires_grad_(False)
        record = EditRecord(index=self.n_edits, case_ids=[r.case_id for r in requests])
        pending: dict[int, object] = {}
        committed: list[int] = []
        try:
            t = time.perf_counter()
            targets = compute_targets(self.model, self.tok, self.arch, layers[-1], requests, templates, self.cfg)
            record.seconds_targets = time.perf_counter() - t
            record.target_nll = [tr.nll for tr in targets]
            z = torch.stack([tr.z for tr in targets]).to(torch.float64)            # n × d
            weights = edit_weights
            for attempt in range(self.cfg.land_retries + 1):
                if attempt:     # the retry starts from the weights before this edit, bit for bit
                    self._put_weights(before)
                    pending.clear()
                record.attempts = attempt + 1
                record.edit_weights = None if weights is None else weights.tolist()
                unmet_before = self._pass_layers(requests, templates, z, weights, record, pending, attempt)
                if attempt == self.cfg.land_retries:
                    break
                ok = self._landed(requests)
                if ok is None or all(ok):
                    break
                if weights is None:
                    weights = torch.ones(len(requests), dtype=torch.float64)
                weights = torch.where(torch.tensor(ok, dtype=torch.bool), weights, weights * self.cfg.land_boost)
            after = block_outputs_at_subject(self.model, self.tok, self.arch, layers[-1], requests)
            record.target_unmet = ((z - after.to(z)).norm(dim=1)
                                   / unmet_before.clamp_min(torch.finfo(torch.float64).tiny)).tolist()
            for l in layers:
                self.rule.commit(l, pending[l])
                committed.append(l)
        except BaseException:
            for l in reversed(committed):
                self.rule.undo(l, pending[l])
            self._put_weights(before)
            raise
        finally:
            self.model.train(was_training)
            for p, flag in zip(self.model.parameters(), grad_flags):
                p.requires_grad_(flag)
        record.seconds_total = time.perf_counter() - t_start
        record.seconds_setup = seconds_setup
        self.n_edits += 1
        self.records.append(record)
        if self._undo.maxlen != 0:
            self._undo.append(_Kept(record.index, before, dict(pending)))
        self.journal.append({"op": "edit", "requests": [r.to_dict() for r in requests], **record.to_dict()})
        return record

    def _pass_layers(self, requests: list[EditRequest], templates, z: torch.Tensor, weights: torch.Tensor | None,
                     record: EditRecord, pending: dict, attempt: int) -> torch.Tensor:
        """One pass over the edited layers towards z; returns ‖z − h‖ per request before it."""
        layers = self.cfg.layers
        unmet_before = None
        for i, layer in enumerate(layers):
            t = time.perf_counter()
            K, current = keys_and_outputs(self.model, self.tok, self.arch, layer, layers[-1], requests, templates)
            gap = z - current.to(z)
            if unmet_before is None:
                unmet_before = gap.norm(dim=1)
            resid = gap / (len(layers) - i)                                      # n × d
            t_keys = time.perf_counter() - t
            W = self.weight(layer)
            norm_before = float(torch.linalg.matrix_norm(W.to(torch.float64)))
            res = self.rule.update(layer, W, K.T.to(W.device, torch.float64), resid.T.to(W.device),
                                   **({} if weights is None else {"edit_weights": weights}))
            if layer in self._master:
                self.arch.weight_view(self.model, layer).copy_(W)
            pending[layer] = res.undo
            record.layers.append(LayerRecord(
                layer=layer, objective=res.objective, objective_identity=res.objective_identity,
                orth_error=res.orth_error, weight_norm_before=norm_before,
                weight_norm_after=float(torch.linalg.matrix_norm(W.to(torch.float64))),
                seconds_keys=t_keys, seconds_solve=res.seconds_solve, seconds_apply=res.seconds_apply,
                attempt=attempt))
        return unmet_before

    def _landed(self, requests: list[EditRequest]) -> list[float] | None:
        """P(new) > P(true) on each request's own prompt (None when a request has no target_true)."""
        from .hf.scoring import landed
        return landed(self.model, self.tok, requests)

    def _put_weights(self, weights: dict[int, torch.Tensor]) -> None:
        """Write host copies of edited matrices back (masters and the parameters they round to)."""
        with torch.no_grad():
            for l, w in weights.items():
                self.weight(l).copy_(w)
                if l in self._master:
                    self.arch.weight_view(self.model, l).copy_(self._master[l])

    def edit_sequential(self, requests: Iterable[EditRequest]) -> list[EditRecord]:
        """One edit per request, in order (each on the model as already edited)."""
        requests = self.validate(requests)
        out = []
        for r in tqdm(requests, desc="sequential edits", unit="edit", disable=not self.progress):
            out.append(self.edit([r]))
        return out

    def undo(self, n: int = 1) -> None:
        """Take back the last ``n`` edits: the weights return bit for bit, the rule's state with them."""
        if n < 0 or n > len(self._undo):
            raise ValueError(f"cannot undo {n} edit(s): {len(self._undo)} can be undone "
                             f"(undo_history={self.cfg.undo_history})")
        for _ in range(n):
            kept = self._undo.pop()
            for layer in reversed(list(kept.records)):
                self.rule.undo(layer, kept.records[layer])
            self._put_weights(kept.weights)
            self.records = [r for r in self.records if r.index != kept.index]
            self.journal.append({"op": "undo", "index": kept.index})

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The edited matrices, their float32 masters and the rule's state, as named tensors (plus
        ``n_edits``): what a checkpoint needs to continue editing where this editor is."""
        out: dict[str, torch.Tensor] = {"n_edits": torch.tensor(self.n_edits)}
        for l in self.cfg.layers:
            out[f"weight.{l}"] = self.arch.weight_view(self.model, l)
            if l in self._master:
                out[f"master.{l}"] = self._master[l]
        out.update({f"rule.{k}": v for k, v in self.rule.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from ``state_dict()``: weights, masters and the rule's state (the undo history is
        not part of it)."""
        missing = [f"weight.{l}" for l in self.cfg.layers if f"weight.{l}" not in state]
        if missing or "n_edits" not in state:
            raise ValueError(f"not an editor state for layers {self.cfg.layers}: missing {missing or ['n_edits']}")
        with torch.no_grad():
            for l in self.cfg.layers:
                W = self.arch.weight_view(self.model, l)
                W.copy_(state[f"weight.{l}"])
                if f"master.{l}" in state:
                    self._master[l] = state[f"master.{l}"].to(W.device, torch.float32).clone()
        self.rule.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rule.")})
        self.n_edits = int(state["n_edits"])
        self._undo.clear()

    # --- inspection and saving ----------------------------------------------------------------------
    @torch.no_grad()
    def spectrum(self, layer: int) -> dict[str, float]:
        """‖W‖_F, σ_max, σ_min and κ₂ of an edited matrix (float64)."""
        return spectrum(self.arch.weight_view(self.model, layer))

    def save(self, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """Write the edited model (safetensors that ``from_pretrained`` loads, also for a model loaded
        from GGUF), the tokenizer, and ``mose_journal.json`` (config, every edit and undo)."""
        from .hf.models import save_model
        journal = {"config": self.cfg.to_dict(), "arch": asdict(self.arch),
                   "model_fingerprint": model_fingerprint(self.model), "entries": self.journal}
        return save_model(self.model, self.tok, out_dir, dtype=dtype,
                          extra_files={"mose_journal.json": json.dumps(journal, indent=1, default=str)})
