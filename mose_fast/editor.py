"""MOSEEditor: batch and sequential edits, journal, exact undo, all-or-nothing semantics.

One edit (a batch of requests), MEMIT's multi-layer schedule with the configured rule's update:

    z       = target residual after the last edited layer           (memit/targets.py)
    for unit (l, m) in forward order, on the model as already edited:
        K_E   = keys of m at l;  h = residual after the last layer   (memit/keys.py, one forward)
        resid = (z − h) / (units left)
        rules[m].update(l, W_{l,m}, K_E, resid)                      W_{l,m} changes in place

The units are the (layer, module) pairs of ``MOSEConfig.layers`` × ``MOSEConfig.modules``, per layer
in the order attn.qk, attn.v, mlp.in, mlp.down (``rules.MODULES``); with the default modules
("mlp.down",) they are the layers and this is MEMIT's schedule.  Each module has its own rule
object and state; the weights it writes (whole parameters, fused ones included) join the host
copies and the undo history.

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
from .memit.keys import (
    SubjectForward,
    block_outputs_at_subject,
    generate_context_templates,
    keys_and_outputs,
    unit_keys_and_outputs,
)
from .memit.stats import key_second_moments, model_fingerprint, statistics_corpus, unit_statistics
from .memit.targets import compute_targets
from .requests import EditRequest
from .rules import MODULES, make_unit_rule
from .rules.rotation import check_edit_weights


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
    module: str = "mlp.down"    # which of MOSEConfig.modules (norms: over all the module's matrices)
    poly_remainder: float | None = None   # mlp.in: ‖ΔMLP_true − ΔMLP_poly‖ / ‖resid‖ at the edit keys
    # ‖z − h‖ (mean over the requests) when this unit began: successive units' values show what each
    # unit of the edit moved the last edited layer's output towards its target
    gap: float | None = None


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
    # P(new) > P(true) on each request's own prompt, measured on the kept weights by the land check
    # (None where the kept solve was not checked: no retries configured, or the last one)
    landed: list[float] | None = None
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


def _host_copy(t: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """A copy in host memory; page-locked (``pin``) only when asked: the undo history's copies are
    read back only by an undo, and pinned they would lock (undo_history + 1) × the edited matrices
    of host memory (see ``mose_fast.backends``, MOSE_PIN_UNDO_COPIES)."""
    if t.device.type == "cpu":
        return t.detach().clone()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    out.copy_(t.detach())
    return out


def _env_flag(name: str, default: str) -> str:
    from .backends import env_choice
    return env_choice(name, default, ("auto", "0", "1"))


@dataclass
class _Kept:
    """What undo() needs of one edit: the weights before it (by layer for mlp.down, by parameter
    name for the other modules) and the rules' records (by (module, layer))."""
    index: int
    weights: dict[int | str, torch.Tensor]
    records: dict[tuple[str, int], object]


class MOSEEditor:
    """Edits a causal LM in place with the rule ``config`` names (default: the ``mose`` preset).

    ``second_moments`` ({layer: C0}) skips the statistics of mlp.down, ``statistics``
    ({module: {layer: {name: tensor}}}, as ``memit.stats.unit_statistics`` returns) those of the
    other modules; ``data_dir`` is where the statistics corpus (WikiText-2) is looked for when
    ``config.stats_corpus`` is not set.  ``statistics_file``: C0 from a file ``mose-fast stats --out``
    wrote (``memit.stats_file``), checked to belong to this model and tokenizer before anything else.

    ``offload_rule_state``: keep each layer's rule state (and C0 until the rule has taken it) in host
    memory and bring one layer's to its device for each rule call (``mose_fast.offload``); None
    (default): MOSE_OFFLOAD_RULE_STATE, "auto" = when the edited weights are on a GPU.
    ``pin_undo_copies``: page-locked host copies for undo; None: MOSE_PIN_UNDO_COPIES (default no)."""

    def __init__(self, model, tok, config: MOSEConfig | None = None, arch: ArchSpec | dict | None = None,
                 second_moments: dict[int, torch.Tensor] | None = None, progress: bool = True,
                 data_dir: str | Path | None = None, statistics: dict | None = None,
                 statistics_file: str | Path | None = None, offload_rule_state: bool | None = None,
                 pin_undo_copies: bool | None = None):
        self.model, self.tok = model, tok
        self.arch = resolve_arch(model, arch)
        self.cfg = config or MOSEConfig.preset("mose", getattr(model.config, "model_type", None))
        self.cfg.validate()
        self.cfg.validate_for_model(self.arch.num_layers(model))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.progress = progress
        self.data_dir = data_dir
        self.modules = [m for m in MODULES if m in self.cfg.modules]        # forward order within a layer
        self.rules = {m: make_unit_rule(self.cfg, m) for m in self.modules}
        self.rule = self.rules["mlp.down"] if "mlp.down" in self.rules else None   # mlp.down's rule
        self._second_moments = dict(second_moments) if second_moments is not None else None
        self._statistics_file = None
        self.statistics_tokens: dict[int, int] = {}     # corpus tokens behind each computed C0
        if statistics_file is not None:
            if second_moments is not None:
                raise ValueError("give second_moments or statistics_file, not both")
            from .memit.stats_file import load_statistics
            self._second_moments = load_statistics(statistics_file, model.config, tok, self.cfg.layers)
            self._statistics_file = str(statistics_file)
        self._statistics = {m: dict(v) for m, v in statistics.items()} if statistics is not None else None
        self._pmaster: dict[str, torch.Tensor] = {}        # float32 masters of the other modules' parameters
        self._templates: list[list[str]] | None = None
        self._corpus = None
        self._master: dict[int, torch.Tensor] = {}         # float32 copies of low-precision weights
        self._prepared: set[int] = set()
        # whether the keys' forwards may replay unchanged blocks, and patch a block whose FFN output
        # projection an edit changed (None: not yet checked on this model)
        self._subject_replay: bool | None = None
        self._subject_patch: bool | None = None
        self._undo: deque[_Kept] = deque(maxlen=self.cfg.undo_history)
        self.records: list[EditRecord] = []
        self.journal: list[dict] = []                      # every edit and undo, in order
        self.n_edits = 0
        from .offload import RuleStateHome
        self._offload = {"1": True, "0": False, "auto": None}[_env_flag("MOSE_OFFLOAD_RULE_STATE", "auto")] \
            if offload_rule_state is None else bool(offload_rule_state)
        self._pin_undo = _env_flag("MOSE_PIN_UNDO_COPIES", "0") == "1" if pin_undo_copies is None \
            else bool(pin_undo_copies)
        self._home = RuleStateHome(pin=_env_flag("MOSE_PIN_RULE_STATE", "1") != "0")
        self._auto_offload: dict[torch.device, bool] = {}

    # --- where the rules' state lives -------------------------------------------------------------
    def offloads(self, device: torch.device) -> bool:
        """Whether the rule state of a layer on ``device`` lives on the host between rule calls: as
        asked, else ("auto") on a GPU where the memory plan with every layer's state resident
        (``mose_fast.plan``, the edit memory at its largest) would take more than 90 % of the device —
        on a card where it fits, the state stays and no edit copies it back and forth."""
        if self._offload is not None:
            return self._offload
        if device.type != "cuda":
            return False
        if device not in self._auto_offload:
            self._auto_offload[device] = self._resident_state_does_not_fit(device)
        return self._auto_offload[device]

    def _resident_state_does_not_fit(self, device: torch.device) -> bool:
        from .plan import plan
        total = torch.cuda.get_device_properties(device).total_memory
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        resident = plan("this model", self.cfg, edits=10 ** 6, batch=self.cfg.target_batch, dtype=dtype,
                        device="cuda", config=self.model.config, offload=False)
        return resident.peak.total > 0.9 * total

    def _unit_device(self, layer: int, module: str) -> torch.device:
        if module == "mlp.down":
            return self.weight(layer).device
        return next(iter(self.arch.unit_params(self.model, layer, module).values())).device

    def _state_on_device(self, module: str, layer: int):
        """Context: the rule state of (module, layer) on the unit's device for a rule call (a no-op
        where the state is not offloaded)."""
        import contextlib
        device = self._unit_device(layer, module)
        if not self.offloads(device):
            return contextlib.nullcontext()
        return self._home.on_device(self.rules[module], layer, device)

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
        if self._statistics_file is not None:
            return f"statistics file {self._statistics_file}"
        if self._corpus is None:
            return "given by the caller" if self._prepared else None
        if isinstance(self._corpus, str):
            return self._corpus
        return f"generated by the model ({len(self._corpus)} texts, seed {self.cfg.seed})"

    def second_moments(self) -> dict[int, torch.Tensor]:
        need = [l for l in self.cfg.layers if l not in self._prepared]
        if self._second_moments is None or any(l not in self._second_moments for l in need):
            device = self.weight(need[-1]).device if need else torch.device("cpu")
            # offloaded: one layer's sums on the device at a time, each C0 on the host until prepared
            groups = [[l] for l in need] if self.offloads(device) else [need]
            fingerprint = model_fingerprint(self.model) if len(groups) > 1 else None
            self._second_moments = {}
            self.statistics_tokens = {}
            for group in groups:
                got = key_second_moments(
                    self.model, self.tok, self.arch, group, self.statistics_corpus(), self.cfg.stats_tokens,
                    self.cfg.stats_seq_len, self.cfg.stats_batch_size, self.cfg.stats_cache_dir, self.progress,
                    fingerprint=fingerprint, used=self.statistics_tokens)
                self._second_moments.update({l: c.to("cpu") for l, c in got.items()} if len(groups) > 1 else got)
                del got
        return self._second_moments

    def _unit_statistics(self, need: dict[str, list[int]]) -> dict[str, dict[int, dict]]:
        """The statistics of the modules but mlp.down (and C0 with them when it is missing too, so
        one forward pass computes everything that is not cached)."""
        have = self._statistics or {}
        missing = {m: [l for l in ls if l not in have.get(m, {})] for m, ls in need.items()}
        missing = {m: ls for m, ls in missing.items() if ls}
        c0_missing = ("mlp.down" in self.rules and
                      (self._second_moments is None or
                       any(l not in self._second_moments for l in self.cfg.layers if l not in self._prepared)))
        if missing and c0_missing:
            missing["mlp.down"] = [l for l in self.cfg.layers if l not in self._prepared]
        if missing:
            got = unit_statistics(self.model, self.tok, self.arch, missing, self.statistics_corpus(),
                                  self.cfg.stats_tokens, self.cfg.stats_seq_len, self.cfg.stats_batch_size,
                                  self.cfg.stats_cache_dir, self.progress)
            if "mlp.down" in got:
                self._second_moments = {**(self._second_moments or {}),
                                        **{l: st["C0"] for l, st in got.pop("mlp.down").items()}}
            have = {m: {**have.get(m, {}), **got.get(m, {})} for m in set(have) | set(got)}
            self._statistics = have
        return have

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

    def unit_params(self, layer: int, module: str) -> dict[str, torch.Tensor]:
        """{parameter name: tensor} a module's rule writes at ``layer`` (float32 masters where kept)."""
        return {n: self._pmaster.get(n, t) for n, t in self.arch.unit_params(self.model, layer, module).items()}

    def unit_weights(self, layer: int, module: str):
        """What the module's rule reads and writes at ``layer``: views of the parameters, or of their
        float32 masters (``hf.arch.unit_weights``)."""
        from .hf.arch import unit_weights
        return unit_weights(self.model, self.arch, layer, module, self._pmaster or None)

    def units(self) -> list[tuple[int, str]]:
        """The (layer, module) units of one edit, in forward order."""
        return [(l, m) for l in self.cfg.layers for m in self.modules]

    def prepare(self) -> None:
        """Statistics, the rules' per-layer state and the context templates (done by the first edit)."""
        need = [l for l in self.cfg.layers if l not in self._prepared]
        if need:
            others = [m for m in self.modules if m != "mlp.down"]
            stats = self._unit_statistics({m: need for m in others}) if others else {}
            if "mlp.down" in self.rules:
                C0 = self.second_moments()
            for l in need:
                if "mlp.down" in self.rules:
                    W = self.arch.weight_view(self.model, l)
                    if self.cfg.master_weights and W.dtype in (torch.bfloat16, torch.float16) and l not in self._master:
                        # rounding W to 8 mantissa bits after every rotation would random-walk the weights;
                        # a float32 master keeps the error to one rounding of the exact product
                        self._master[l] = W.float()
                    with self._state_on_device("mlp.down", l):
                        self.rule.prepare(l, self.weight(l), C0.pop(l))
                for m in others:
                    for name, t in self.arch.unit_params(self.model, l, m).items():
                        if self.cfg.master_weights and t.dtype in (torch.bfloat16, torch.float16) \
                                and name not in self._pmaster:
                            self._pmaster[name] = t.float()
                    with self._state_on_device(m, l):
                        self.rules[m].prepare(l, self.unit_weights(l, m), stats[m].pop(l))
                self._prepared.add(l)
            self._second_moments = None     # the rules keep what they need of the statistics
            self._statistics = None
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
            if not all(r.supports_edit_weights for r in self.rules.values()):
                raise ValueError(f"edit_weights need a MOSE rule; this editor's rule is {self.cfg.method!r}")
            edit_weights = check_edit_weights(edit_weights, len(requests))
        t_setup = time.perf_counter()
        self.prepare()
        templates = self.context_templates()
        seconds_setup = time.perf_counter() - t_setup
        t_start = time.perf_counter()
        layers = self.cfg.layers
        pin = self._pin_undo and torch.cuda.is_available()
        before = {l: _host_copy(self.weight(l), pin) for l in layers} if "mlp.down" in self.rules else {}
        for l, m in self.units():
            if m != "mlp.down":
                before.update({n: _host_copy(t, pin) for n, t in self.unit_params(l, m).items() if n not in before})
        was_training = self.model.training
        grad_flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval().requires_grad_(False)
        record = EditRecord(index=self.n_edits, case_ids=[r.case_id for r in requests])
        pending: dict[tuple[str, int], object] = {}
        committed: list[tuple[str, int]] = []
        try:
            t = time.perf_counter()
            targets = compute_targets(self.model, self.tok, self.arch, layers[-1], requests, templates, self.cfg)
            record.seconds_targets = time.perf_counter() - t
            record.target_nll = [tr.nll for tr in targets]
            z = torch.stack([tr.z for tr in targets]).to(torch.float64)            # n × d
            forward = SubjectForward(self.model, self.tok, self.arch, requests, templates,
                                     check=self._subject_replay is None)
            forward.replays = self._subject_replay is not False
            forward.patches = self._subject_patch is not False
            forward.check_patch = self._subject_patch is None
            weights = edit_weights
            first_keys: dict = {}       # the first unit's keys: the same in every attempt
            for attempt in range(self.cfg.land_retries + 1):
                if attempt:     # the retry starts from the weights before this edit, bit for bit
                    self._put_weights(before)
                    forward.rewind(self.units()[0][0])
                    pending.clear()
                record.attempts = attempt + 1
                record.edit_weights = None if weights is None else weights.tolist()
                unmet_before = self._pass_units(requests, templates, z, weights, record, pending, attempt, forward,
                                                first_keys)
                if attempt == self.cfg.land_retries:
                    break
                ok = self._landed(requests)
                if ok is None or all(ok):
                    record.landed = ok
                    break
                if weights is None:
                    weights = torch.ones(len(requests), dtype=torch.float64)
                weights = torch.where(torch.tensor(ok, dtype=torch.bool), weights, weights * self.cfg.land_boost)
            after = block_outputs_at_subject(self.model, self.tok, self.arch, layers[-1], requests, forward)
            if not forward.check:                  # the replay was compared with a full forward
                self._subject_replay = forward.replays
            if not forward.check_patch:            # a patched block was compared with a computed one
                self._subject_patch = forward.patches
            record.target_unmet = ((z - after.to(z)).norm(dim=1)
                                   / unmet_before.clamp_min(torch.finfo(torch.float64).tiny)).tolist()
            for l, m in self.units():
                with self._state_on_device(m, l):
                    self.rules[m].commit(l, pending[(m, l)])
                committed.append((m, l))
        except BaseException:
            for m, l in reversed(committed):
                with self._state_on_device(m, l):
                    self.rules[m].undo(l, pending[(m, l)])
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

    def _pass_units(self, requests: list[EditRequest], templates, z: torch.Tensor, weights: torch.Tensor | None,
                    record: EditRecord, pending: dict, attempt: int, forward: SubjectForward,
                    first_keys: dict | None = None) -> torch.Tensor:
        """One pass over the edit's units towards z; returns ‖z − h‖ per request before it.  The keys
        are read with ``forward`` (told of every block the pass changes); ``first_keys`` holds the
        first unit's keys and outputs once read (a re-solve starts from the same weights)."""
        layers = self.cfg.layers
        units = self.units()
        unmet_before = None
        first_keys = {} if first_keys is None else first_keys
        for i, (layer, module) in enumerate(units):
            t = time.perf_counter()
            if module == "mlp.down" and i == 0 and "K" in first_keys:
                K, current = first_keys["K"], first_keys["h"]
            elif module == "mlp.down":
                K, current = keys_and_outputs(self.model, self.tok, self.arch, layer, layers[-1], requests, templates,
                                              forward)
                if i == 0:
                    first_keys.update(K=K, h=current)
            else:
                K, current = unit_keys_and_outputs(self.model, self.tok, self.arch, layer, module, layers[-1],
                                                   requests, templates, forward)
            gap = z - current.to(z)
            if unmet_before is None:
                unmet_before = gap.norm(dim=1)
            resid = gap / (len(units) - i)                                       # n × d
            t_keys = time.perf_counter() - t
            gap_now = float(gap.norm(dim=1).mean())
            forward.edited(layer)                     # the update below changes block `layer`
            if module != "mlp.down":
                self._update_unit(layer, module, K, resid, weights, record, pending, attempt, t_keys, gap_now)
                continue
            W = self.weight(layer)
            norm_before = float(torch.linalg.matrix_norm(W.to(torch.float64)))
            with self._state_on_device(module, layer):
                res = self.rule.update(layer, W, K.T.to(W.device, torch.float64), resid.T.to(W.device),
                                       **({} if weights is None else {"edit_weights": weights}))
            if layer in self._master:
                self.arch.weight_view(self.model, layer).copy_(W)
            t = time.perf_counter()
            forward.patch(layer)                      # block `layer`'s recorded output, from the new W
            t_keys += time.perf_counter() - t
            pending[(module, layer)] = res.undo
            record.layers.append(LayerRecord(
                layer=layer, objective=res.objective, objective_identity=res.objective_identity,
                orth_error=res.orth_error, weight_norm_before=norm_before,
                weight_norm_after=float(torch.linalg.matrix_norm(W.to(torch.float64))),
                seconds_keys=t_keys, seconds_solve=res.seconds_solve, seconds_apply=res.seconds_apply,
                attempt=attempt, gap=gap_now))
        return unmet_before

    def _update_unit(self, layer: int, module: str, K, resid: torch.Tensor, weights: torch.Tensor | None,
                     record: EditRecord, pending: dict, attempt: int, t_keys: float, gap: float) -> None:
        """One unit of a module other than mlp.down: its rule rotates its matrices in place (views of
        the parameters or their masters; a master's parameter is then rounded from it)."""
        Wu = self.unit_weights(layer, module)

        def norm() -> float:
            return float(sum(torch.linalg.matrix_norm(w.to(torch.float64)) ** 2 for w in Wu.matrices().values()) ** 0.5)
        norm_before = norm()
        if not isinstance(K, torch.Tensor):           # attn.qk: a QKKeys
            K.q, K.J = K.q.to(resid.device), K.J.to(resid.device)
            keys = K
        else:
            keys = K.T.to(torch.float64)
        with self._state_on_device(module, layer):
            res = self.rules[module].update(layer, Wu, keys, resid.T.to(torch.float64),
                                            **({} if weights is None else {"edit_weights": weights}))
        with torch.no_grad():
            for name, t in self.arch.unit_params(self.model, layer, module).items():
                if name in self._pmaster:
                    t.copy_(self._pmaster[name])
        pending[(module, layer)] = res.undo
        record.layers.append(LayerRecord(
            layer=layer, objective=res.objective, objective_identity=res.objective_identity,
            orth_error=res.orth_error, weight_norm_before=norm_before, weight_norm_after=norm(),
            seconds_keys=t_keys, seconds_solve=res.seconds_solve, seconds_apply=res.seconds_apply,
            attempt=attempt, module=module, poly_remainder=getattr(res, "poly_remainder", None), gap=gap))

    def _landed(self, requests: list[EditRequest]) -> list[float] | None:
        """P(new) > P(true) on each request's own prompt (None when a request has no target_true)."""
        from .hf.scoring import landed
        return landed(self.model, self.tok, requests)

    def _put_weights(self, weights: dict[int | str, torch.Tensor]) -> None:
        """Write host copies of edited matrices back (masters and the parameters they round to):
        by layer for mlp.down, by parameter name for the other modules."""
        params = None
        with torch.no_grad():
            for l, w in weights.items():
                if isinstance(l, str):
                    if params is None:
                        params = dict(self.model.named_parameters())
                    if l in self._pmaster:
                        self._pmaster[l].copy_(w)
                    params[l].data.copy_(w)
                    continue
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
            for module, layer in reversed(list(kept.records)):
                with self._state_on_device(module, layer):
                    self.rules[module].undo(layer, kept.records[(module, layer)])
            self._put_weights(kept.weights)
            self.records = [r for r in self.records if r.index != kept.index]
            self.journal.append({"op": "undo", "index": kept.index})

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The edited matrices, their float32 masters and the rule's state, as named tensors (plus
        ``n_edits``): what a checkpoint needs to continue editing where this editor is."""
        out: dict[str, torch.Tensor] = {"n_edits": torch.tensor(self.n_edits)}
        if "mlp.down" in self.rules:
            for l in self.cfg.layers:
                out[f"weight.{l}"] = self.arch.weight_view(self.model, l)
                if l in self._master:
                    out[f"master.{l}"] = self._master[l]
            out.update({f"rule.{k}": v for k, v in self.rule.state_dict().items()})
        for l, m in self.units():
            if m == "mlp.down":
                continue
            for name, t in self.arch.unit_params(self.model, l, m).items():
                out[f"param.{name}"] = t
                if name in self._pmaster:
                    out[f"param_master.{name}"] = self._pmaster[name]
        for m in self.modules:
            if m != "mlp.down":
                out.update({f"rule.{m}.{k}": v for k, v in self.rules[m].state_dict().items()})
        return out

    WEIGHT_KEYS = ("weight", "master", "param", "param_master", "n_edits")

    def weights_dict(self) -> dict[str, torch.Tensor]:
        """The part of ``state_dict()`` that is the edited model: every edited matrix, its float32
        master and ``n_edits``, without the rules' state (what ``load_weights`` needs)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in self.WEIGHT_KEYS}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put the edited matrices (and masters) of ``weights_dict()`` or ``state_dict()`` into the
        model; every matrix is checked to be present before any is written."""
        down = "mlp.down" in self.rules
        missing = [f"weight.{l}" for l in self.cfg.layers if down and f"weight.{l}" not in state]
        others = [(l, m) for l, m in self.units() if m != "mlp.down"]
        params = {n: t for l, m in others for n, t in self.arch.unit_params(self.model, l, m).items()}
        missing += [f"param.{n}" for n in params if f"param.{n}" not in state]
        if missing or "n_edits" not in state:
            raise ValueError(f"not an editor state for layers {self.cfg.layers} and modules {self.modules}: "
                             f"missing {missing or ['n_edits']}")
        targets = {f"weight.{l}": self.arch.weight_view(self.model, l) for l in (self.cfg.layers if down else ())}
        targets.update({f"param.{n}": t for n, t in params.items()})
        wrong = [f"{k} {tuple(state[k].shape)} (the model's is {tuple(t.shape)})"
                 for k, t in targets.items() if state[k].shape != t.shape]
        if wrong:
            raise ValueError(f"editor state does not fit this model: {', '.join(wrong)}")
        with torch.no_grad():
            for l in self.cfg.layers if down else ():
                W = self.arch.weight_view(self.model, l)
                W.copy_(state[f"weight.{l}"])
                if f"master.{l}" in state:
                    self._master[l] = state[f"master.{l}"].to(W.device, torch.float32).clone()
            for n, t in params.items():
                t.copy_(state[f"param.{n}"])
                if f"param_master.{n}" in state:
                    self._pmaster[n] = state[f"param_master.{n}"].to(t.device, torch.float32).clone()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from ``state_dict()``: weights, masters and the rule's state (the undo history is
        not part of it)."""
        self.load_weights(state)
        down = "mlp.down" in self.rules
        prefixes = tuple(f"rule.{m}." for m in self.modules if m != "mlp.down")
        if down:
            self.rule.load_state_dict({k[5:]: v for k, v in state.items()
                                       if k.startswith("rule.") and not k.startswith(prefixes)})
        for m in self.modules:
            if m != "mlp.down":
                p = f"rule.{m}."
                self.rules[m].load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        self.n_edits = int(state["n_edits"])
        self._undo.clear()

    def rule_state_bytes(self) -> int:
        """Bytes of every tensor the rules hold (all modules, all layers)."""
        return sum(rule.state_bytes() for rule in self.rules.values())

    # --- inspection and saving ----------------------------------------------------------------------
    @torch.no_grad()
    def spectrum(self, layer: int) -> dict[str, float]:
        """‖W‖_F, σ_max, σ_min and κ₂ of an edited matrix (float64)."""
        return spectrum(self.arch.weight_view(self.model, layer))

    @torch.no_grad()
    def unit_spectra(self) -> dict[str, dict[str, float]]:
        """``spectrum`` of every matrix the modules but mlp.down rotate, by "module.layer.matrix"
        (e.g. "attn.qk.4.q", "mlp.in.4.gate"), read from the parameters."""
        from .hf.arch import unit_weights
        out = {}
        for l, m in self.units():
            if m != "mlp.down":
                for name, W in unit_weights(self.model, self.arch, l, m).matrices().items():
                    out[f"{m}.{l}.{name}"] = spectrum(W)
        return out

    def save(self, out_dir: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """Write the edited model (safetensors that ``from_pretrained`` loads, also for a model loaded
        from GGUF), the tokenizer, and ``mose_journal.json`` (config, every edit and undo)."""
        from .hf.models import save_model
        journal = {"config": self.cfg.to_dict(), "arch": asdict(self.arch),
                   "model_fingerprint": model_fingerprint(self.model), "entries": self.journal}
        return save_model(self.model, self.tok, out_dir, dtype=dtype,
                          extra_files={"mose_journal.json": json.dumps(journal, indent=1, default=str)})
