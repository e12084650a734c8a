"""MOSEEditor: batch and sequential edits, journal, exact undo, all-or-nothing semantics.

One edit (a batch of requests), MEMIT's multi-layer schedule with MOSE's update:

    z       = target residual after the last edited layer           (targets.py)
    for layer l in layers (first to last), on the model as already edited:
        K_E   = keys at l                                          (keys.py)
        resid = (z − current residual at the last layer) / (layers left)
        A_E   = W_l·K_E ,  V_E = A_E + resid
        R     = polar(λ·P_l + V_E·A_Eᵀ) ;  W_l ← R·W_l ;  P_l ← R·P_l·R ᵀ

If anything raises before the edit completes, every touched weight (and retention Gram) is put
back from a snapshot taken before the first write, bit for bit.
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

from .hf.arch import ArchSpec, resolve_arch
from .config import MOSEConfig
from .memit.keys import (block_outputs_at_subject, compute_template_keys, generate_context_templates, mean_key,
                   template_weights)
from .requests import EditRequest
from .rules import make_rule
from .rules.mose import check_edit_weights
from .memit.stats import default_data_dir, key_second_moments, model_fingerprint
from .memit.targets import compute_targets

@dataclass
class LayerRecord:
    layer: int
    objective: float            # Procrustes objective at the chosen R
    objective_identity: float   # ... at R = I
    orth_error: float           # ‖RᵀR − I‖_F (solve dtype)
    weight_norm_before: float   # ‖W‖_F
    weight_norm_after: float
    seconds_keys: float
    seconds_solve: float
    seconds_apply: float
    edit_pass: int = 0          # which pass over the layers (MOSEConfig.edit_passes)
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
    attempts: int = 1               # solves of this edit (1 + retries, MOSEConfig.land_retries)
    edit_weights: list[float] | None = None   # per-request edit-term weights of the kept solve
    seconds_targets: float = 0.0
    seconds_total: float = 0.0      # this edit, excluding one-time setup
    seconds_setup: float = 0.0      # C0 statistics, retention Grams, context templates (first edit)

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


class MOSEEditor:
    def __init__(self, model, tok, config: MOSEConfig | None = None, arch: ArchSpec | dict | None = None,
                 second_moments: dict[int, torch.Tensor] | None = None, progress: bool = True):
        self.model, self.tok = model, tok
        self.arch = resolve_arch(model, arch)
        self.cfg = config or MOSEConfig.preset(getattr(model.config, "model_type", ""))
        self.cfg.validate()
        n_layers = self.arch.num_layers(model)
        bad = [l for l in self.cfg.layers if l >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.progress = progress
        self.rule = make_rule(self.cfg)
        self._second_moments = dict(second_moments) if second_moments is not None else None
        self._templates: list[list[str]] | None = None
        self._master: dict[int, torch.Tensor] = {}         # float32 copies of low-precision weights
        self._prepared: set[int] = set()
        self._undo: deque = deque(maxlen=self.cfg.undo_history)  # (record index, {layer: undo data})
        self.records: list[EditRecord] = []
        self.journal: list[dict] = []                      # every edit and undo, in order
        self._n_edits = 0

    # --- lazily built state -------------------------------------------------------------------
    def second_moments(self) -> dict[int, torch.Tensor]:
        if self._second_moments is None or any(l not in self._second_moments for l in self.cfg.layers):
            corpus = self.cfg.stats_corpus or str(default_data_dir() / "wikitext-2" / "valid.txt")
            self._second_moments = key_second_moments(
                self.model, self.tok, self.arch, self.cfg.layers, corpus, self.cfg.stats_tokens,
                self.cfg.stats_seq_len, self.cfg.stats_batch_size, self.cfg.stats_cache_dir, self.progress)
        return self._second_moments

    def context_templates(self) -> list[list[str]]:
        if self._templates is None:
            self._templates = generate_context_templates(
                self.model, self.tok, self.cfg.context_template_prefixes, self.cfg.context_template_length,
                self.cfg.seed)
        return self._templates

    def weight(self, layer: int) -> torch.Tensor:
        """The matrix the rotation acts on: the float32 master for bf16/fp16 weights, else the
        parameter itself (as a d_out × d_in view)."""
        return self._master.get(layer, self.arch.weight_view(self.model, layer))

    def _prepare(self) -> None:
        need = [l for l in self.cfg.layers if l not in self._prepared]
        if not need:
            return
        C0 = self.second_moments()
        for l in need:
            W = self.arch.weight_view(self.model, l)
            if self.cfg.master_weights and W.dtype in (torch.bfloat16, torch.float16):
                # Rounding W to 8 mantissa bits after every rotation would random-walk the weights;
                # a float32 master keeps the drift to one rounding from the exact product.
                self._master[l] = W.float()
            self.rule.prepare(l, self.weight(l), C0[l])
            self._prepared.add(l)
        # MOSE's Grams P carry all that later edits need of C0: the d_in × d_in matrices can go
        # (additive rules keep what they need of C0 themselves).
        self._second_moments = None

    # --- editing -------------------------------------------------------------------------------
    def validate(self, requests: Iterable[EditRequest]) -> list[EditRequest]:
        requests = list(requests)
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
        if isinstance(requests, EditRequest):
            requests = [requests]
        requests = self.validate(requests)
        if edit_weights is not None:
            if not getattr(self.rule, "supports_edit_weights", False):
                raise ValueError(f"edit_weights need a MOSE rule; this editor's rule is {self.cfg.method!r}")
            edit_weights = check_edit_weights(edit_weights, len(requests))
        t_setup = time.perf_counter()
        self._prepare()
        templates = self.context_templates()
        seconds_setup = time.perf_counter() - t_setup
        t_start = time.perf_counter()
        layers = self.cfg.layers
        snapshot = self._snapshot()
        was_training = self.model.training
        grad_flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval().requires_grad_(False)
        record = EditRecord(index=self._n_edits, case_ids=[r.case_id for r in requests])
        rotations: dict[int, list] = {}   # per layer, per pass: what the rule needs to undo it
        try:
            t = time.perf_counter()
            targets = compute_targets(self.model, self.tok, self.arch, layers[-1], requests, templates, self.cfg,
                                      self.progress)
            record.seconds_targets = time.perf_counter() - t
            record.target_nll = [tr.nll for tr in targets]
            z = torch.stack([tr.z for tr in targets]).to(torch.float64)            # n × d
            weights = edit_weights          # validated float64 vector or None; never written in place
            for attempt in range(self.cfg.land_retries + 1):
                if attempt:
                    # the retry starts from the state before this edit, bit for bit
                    self._restore(snapshot, copy=True)
                    rotations.clear()
                record.attempts = attempt + 1
                record.edit_weights = None if weights is None else weights.tolist()
                unmet_before = self._pass_layers(requests, templates, z, weights, record, rotations, attempt)
                if attempt == self.cfg.land_retries:
                    break
                ok = self._landed(requests)
                if ok is None or all(ok):
                    break
                # the requests that missed weigh land_boost times more in the next solve
                if weights is None:
                    weights = torch.ones(len(requests), dtype=torch.float64)
                weights = torch.where(torch.tensor(ok, dtype=torch.bool), weights, weights * self.cfg.land_boost)
            after = block_outputs_at_subject(self.model, self.tok, self.arch, layers[-1], requests)
            record.target_unmet = ((z - after.to(torch.float64)).norm(dim=1)
                                   / unmet_before.clamp_min(torch.finfo(torch.float64).tiny)).tolist()
        except BaseException:
            self._restore(snapshot)
            raise
        finally:
            self.model.train(was_training)
            for p, flag in zip(self.model.parameters(), grad_flags):
                p.requires_grad_(flag)
        record.seconds_total = time.perf_counter() - t_start
        record.seconds_setup = seconds_setup
        self._n_edits += 1
        self.records.append(record)
        self._undo.append((record.index, rotations))
        self.journal.append({"op": "edit", "requests": [r.to_dict() for r in requests], **record.to_dict()})
        return record

    def _pass_layers(self, requests: list[EditRequest], templates, z: torch.Tensor, weights: torch.Tensor | None,
                     record: EditRecord, rotations: dict, attempt: int) -> torch.Tensor:
        """The passes over the edited layers towards z (MEMIT's schedule, the rule's update at each
        layer); appends to ``record.layers`` and ``rotations``.  Returns ‖z − h‖ per request before."""
        layers = self.cfg.layers
        n_passes = self.cfg.edit_passes
        unmet_before = None
        for edit_pass in range(n_passes):
            last_pass = edit_pass == n_passes - 1
            for i, layer in enumerate(layers):
                t = time.perf_counter()
                rows = compute_template_keys(self.model, self.tok, self.arch, layer, requests, templates)
                K = mean_key(rows, templates).to(torch.float64)
                extra = {} if weights is None else {"edit_weights": weights}
                if getattr(self.rule, "template_keys", "mean") != "mean":
                    # the rule also wants every context's key (MOSEInputRule template_keys)
                    extra["per_template"] = (rows.permute(2, 0, 1).to(torch.float64), template_weights(templates))
                current = block_outputs_at_subject(self.model, self.tok, self.arch, layers[-1], requests)
                if unmet_before is None:
                    unmet_before = (z - current.to(torch.float64)).norm(dim=1)
                resid = (z - current.to(torch.float64)) / (len(layers) - i)        # n × d
                t_keys = time.perf_counter() - t
                W = self.weight(layer)
                norm_before = float(torch.linalg.matrix_norm(W.to(torch.float64)))
                # edit memory / K_p take this edit's keys once, in the last pass (see MOSEConfig)
                res = self.rule.update(layer, W, K.T.to(W.device), resid.T.to(W.device), remember=last_pass, **extra)
                if last_pass:
                    self.rule.after_edit(layer, K.T)
                if layer in self._master:
                    self.arch.weight_view(self.model, layer).copy_(W)
                rotations.setdefault(layer, []).append(res.undo)
                record.layers.append(LayerRecord(
                    layer=layer, objective=res.objective, objective_identity=res.objective_identity,
                    orth_error=res.orth_error, weight_norm_before=norm_before,
                    weight_norm_after=float(torch.linalg.matrix_norm(W.to(torch.float64))),
                    seconds_keys=t_keys, seconds_solve=res.seconds_solve, seconds_apply=res.seconds_apply,
                    edit_pass=edit_pass, attempt=attempt))
        return unmet_before

    def _landed(self, requests: list[EditRequest]) -> list[float] | None:
        """P(new) > P(true) on each request's own prompt (None when a request has no target_true)."""
        from .eval.metrics import landed     # eval imports the editor; import here, not at the top
        return landed(self.model, self.tok, requests)

    def edit_sequential(self, requests: Iterable[EditRequest]) -> list[EditRecord]:
        """One edit per request, in order (each on the model as already edited)."""
        requests = self.validate(requests)
        out = []
        for r in tqdm(requests, desc="sequential edits", unit="edit", disable=not self.progress):
            out.append(self.edit([r]))
        return out

    def undo(self, n: int = 1) -> None:
        """Revert the last ``n`` edits by applying Rᵀ in reverse order (exact up to rounding)."""
        if n < 0 or n > len(self._undo):
            raise ValueError(f"cannot undo {n} edit(s): {len(self._undo)} can be undone "
                             f"(undo_history={self.cfg.undo_history})")
        for _ in range(n):
            index, rotations = self._undo.pop()
            for layer in reversed(list(rotations)):
                W = self.weight(layer)
                for undo in reversed(rotations[layer]):     # one per pass, undone last first
                    self.rule.revert(layer, W, undo)
                if layer in self._master:
                    self.arch.weight_view(self.model, layer).copy_(W)
            self.records = [r for r in self.records if r.index != index]
            self.journal.append({"op": "undo", "index": index})

    # --- snapshots --------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {
            "weights": {l: self.arch.weight_view(self.model, l).clone() for l in self.cfg.layers},
            "master": {l: w.clone() for l, w in self._master.items()},
            "rule": self.rule.snapshot(),
        }

    def _restore(self, snap: dict, copy: bool = False) -> None:
        """Put the snapshot back; ``copy`` keeps it usable again (the rule takes copies of its state)."""
        with torch.no_grad():
            for l, w in snap["weights"].items():
                self.arch.weight_view(self.model, l).copy_(w)
            for l, w in snap["master"].items():
                self._master[l].copy_(w)
            rule_state = snap["rule"]
            if copy:
                rule_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rule_state.items()}
            self.rule.restore(rule_state)

    # --- inspection and saving -------------------------------------------------------------------
    @torch.no_grad()
    def spectrum(self, layer: int) -> dict[str, float]:
        """‖W‖_F, σ_max, σ_min and κ₂ of an edited matrix (float64)."""
        return spectrum(self.arch.weight_view(self.model, layer))

    def save(self, out_dir: str | Path) -> Path:
        """Write the edited model (safetensors, loadable with from_pretrained), the tokenizer, and
        ``mose_journal.json`` (config, every edit and undo with its records)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tok.save_pretrained(out)
        journal = {"config": self.cfg.to_dict(), "arch": asdict(self.arch),
                   "model_fingerprint": model_fingerprint(self.model), "entries": self.journal}
        (out / "mose_journal.json").write_text(json.dumps(journal, indent=1, default=str))
        return out
