"""Long sequential-editing runs with periodic evaluation, resumable from their run folder
(``store.RunFolder``); and the short before/after run.  Uses only the editor's public API."""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import MOSEConfig
from ..editor import MOSEEditor, spectrum
from ..hf.scoring import landed
from ..memit.stats import default_data_dir
from ..requests import EditRequest
from .general import load_task, perplexity, task_accuracy
from .metrics import AGE_BINS, by_age, locality_items, score_cases, summarize, teacher_forced_argmax, token_scores
from .report import before_after_summary, build_report, git_commit, machine
from .store import INITIAL_EVAL_SETTINGS, RunFolder, read_lines, write_report


@dataclass
class EvalSettings:
    eval_every: int = 100
    batch_size: int = 1
    glue_tasks: tuple[str, ...] = ("sst2",)
    glue_n: int | None = 200        # items of each task (None: all of them)
    ppl_tokens: int = 20_000
    data_dir: str | None = None
    checkpoint_every: int = 1       # edits (batches) between saved states; evaluation points always save
    # evaluation points (edits made); None: every ``eval_every`` edits.  The end of the run always is one.
    eval_at: tuple[int, ...] | None = None
    # edited cases scored at an evaluation point: a uniform sample of this many of the cases edited so
    # far (``evaluation_sample``, fixed by ``sample_seed`` and the case ids), and the last batch on its
    # own; None: every edited case
    sample: int | None = None
    sample_seed: int = 0
    # the run's first ``background`` edits are a load the model takes before the cases it is scored on:
    # evaluations score (and sample) only the cases after them, row 0 scores those cases unedited
    background: int = 0
    # cases the run never edits, scored at every evaluation (the first ``control_n`` of the requests file
    # ``control``): how far the model drifts on facts nobody edited, the level the edited cases' scores
    # are to be read against
    control: str | None = None
    control_n: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["glue_tasks"] = list(self.glue_tasks)
        if not self.background:                  # as runs made before these settings existed
            del d["background"]
        if self.control is None:
            del d["control"], d["control_n"]
        for name in ("eval_at", "sample"):       # unset: as runs made before these settings existed
            if d[name] is None:
                del d[name]
            elif name == "eval_at":
                d[name] = list(d[name])
        if self.sample is None:
            del d["sample_seed"]
        return d

    def validate(self) -> None:
        """Settings and the data they read, checked before any model is loaded."""
        from .general import TASKS
        for name in ("eval_every", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"evaluation setting {name} = {v!r}: must be an integer ≥ 1")
        if (self.glue_n is not None and self.glue_n < 1) or self.ppl_tokens < 0:
            raise ValueError(f"evaluation settings glue_n = {self.glue_n}, ppl_tokens = {self.ppl_tokens}: need ≥ 1 "
                             "(or all) / ≥ 0")
        if self.eval_at is not None:
            points = list(self.eval_at)
            if not points or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in points) \
                    or points != sorted(set(points)):
                raise ValueError(f"evaluation setting eval_at = {self.eval_at!r}: must be increasing edit counts ≥ 1")
        if self.sample is not None and (isinstance(self.sample, bool) or not isinstance(self.sample, int)
                                        or self.sample < 1):
            raise ValueError(f"evaluation setting sample = {self.sample!r}: "
                             "must be an integer ≥ 1 (or None: all cases)")
        if isinstance(self.sample_seed, bool) or not isinstance(self.sample_seed, int):
            raise ValueError(f"evaluation setting sample_seed = {self.sample_seed!r}: must be an integer")
        if isinstance(self.background, bool) or not isinstance(self.background, int) or self.background < 0:
            raise ValueError(f"evaluation setting background = {self.background!r}: must be an integer ≥ 0")
        if self.background and self.background % self.batch_size:
            raise ValueError(f"evaluation settings background = {self.background}, batch_size = {self.batch_size}: "
                             "the background must be whole batches (a batch never mixes it with scored cases)")
        if self.background and self.eval_at is not None and min(self.eval_at) <= self.background:
            raise ValueError(f"evaluation setting eval_at = {list(self.eval_at)}: every point must come after the "
                             f"{self.background} background edits (points count every edit, the background's too)")
        if (self.control is None) != (not self.control_n):
            raise ValueError(f"evaluation settings control = {self.control!r}, control_n = {self.control_n!r}: "
                             "a control file needs a number of its cases ≥ 1, and a number needs the file")
        if self.control is not None:
            if isinstance(self.control_n, bool) or not isinstance(self.control_n, int) or self.control_n < 1:
                raise ValueError(f"evaluation setting control_n = {self.control_n!r}: must be an integer ≥ 1")
            if not Path(self.control).is_file():
                raise FileNotFoundError(f"control cases: {self.control} not found")
        data = Path(self.data_dir) if self.data_dir else default_data_dir()
        for task in self.glue_tasks:
            if task not in TASKS:
                raise ValueError(f"glue task {task!r}: choose from {sorted(TASKS)}")
            if not (data / "glue" / f"{task}.json").is_file():
                raise FileNotFoundError(f"{data / 'glue' / f'{task}.json'} not found (set --data-dir or MOSE_DATA_DIR)")
        if self.ppl_tokens and not (data / "wikitext-2" / "test.txt").is_file():
            raise FileNotFoundError(f"{data / 'wikitext-2' / 'test.txt'} not found (set --data-dir or MOSE_DATA_DIR)")


# --- evaluation at one point of the run ---------------------------------------------------------

def control_cases(settings: EvalSettings, run_case_ids: list | None = None) -> list[EditRequest]:
    """The control cases of ``settings`` (none without a control file); with ``run_case_ids``, refused
    where the run edits any of them (they would not be controls)."""
    if settings.control is None:
        return []
    from ..requests import load_benchmark
    cases, _ = load_benchmark(Path(settings.control), limit=settings.control_n)
    if run_case_ids is not None:
        shared = sorted({r.case_id for r in cases} & set(run_case_ids), key=str)
        if shared:
            raise ValueError(f"control cases {settings.control}: case ids {shared[:5]} are edited by the run")
    return cases


def evaluation_sample(case_ids: list, size: int | None, seed: int) -> list[int]:
    """Positions (in order) of a uniform sample of ``size`` of the cases ``case_ids``: those whose
    SHA-256 of ``"{seed}:{case_id}"`` is smallest.  The same seed and cases give the same sample on
    any machine and Python; a case's rank does not depend on the other cases, so the sample of a
    longer prefix of a run keeps every earlier-sampled case that still ranks among the smallest."""
    if size is None or size >= len(case_ids):
        return list(range(len(case_ids)))
    rank = sorted(range(len(case_ids)),
                  key=lambda i: hashlib.sha256(f"{seed}:{case_ids[i]}".encode()).digest())
    return sorted(rank[:size])


def _locality_slices(requests: list[EditRequest], reference: list, picked: list[int]) -> list:
    """The entries of a run's flat locality reference (every case's neighbourhood prompts in order)
    that belong to the cases at ``picked``."""
    offsets = [0]
    for r in requests:
        offsets.append(offsets[-1] + len(r.neighborhood_prompts))
    return [p for i in picked for p in reference[offsets[i]:offsets[i + 1]]]


def evaluate(editor: MOSEEditor, requests: list[EditRequest], settings: EvalSettings, W0: dict[int, torch.Tensor],
             n_done: int, locality_reference: list[list[int]] | None = None, last_batch: int = 0) -> dict:
    """One evaluation point after ``n_done`` edits: the edited cases (all, or the sample of
    ``settings.sample`` and the last ``last_batch`` cases scored on their own), general ability and
    the edited matrices' spectra.  Before editing (``n_done`` 0) the cases are all of the run's
    (or their sample), and ``locality_predictions`` holds the model's argmax on every case's
    locality prompts: the token protocol's reference for the rest of the run."""
    model, tok = editor.model, editor.tok
    data = Path(settings.data_dir) if settings.data_dir else default_data_dir()
    t = time.perf_counter()
    out: dict = {"n_edits": n_done}
    # the scored cases: those after the background, edited so far (before editing: all of them)
    start = settings.background
    if n_done and n_done <= start:
        raise ValueError(f"an evaluation after {n_done} edits scores nothing: the first {start} are background")
    requests = requests[start:]
    n_done -= start if n_done else 0
    edited = requests[:n_done] if n_done else requests
    picked = evaluation_sample([r.case_id for r in edited], settings.sample, settings.sample_seed)
    last = list(range(n_done - last_batch, n_done)) if (settings.sample is not None and n_done) else []
    scored = sorted(set(picked) | set(last))
    scores = dict(zip(scored, score_cases(model, tok, [requests[i] for i in scored])))
    cases = [requests[i] for i in picked]
    out["edit"] = summarize([scores[i] for i in picked])
    out["edit"]["cases"] = "edited so far" if n_done else "all cases of the run, before editing"
    if start:
        out["edit"]["cases"] += f" after the {start} background edits"
    if settings.sample is not None:
        out["edit"]["cases"] += f" (uniform sample of {len(picked)}, seed {settings.sample_seed})"
        out["sample"] = {"size": settings.sample, "seed": settings.sample_seed,
                         "case_ids": [requests[i].case_id for i in picked]}
        if last:
            out["edit_last_batch"] = summarize([scores[i] for i in last])
    if n_done:
        out["edit_by_age"] = by_age([scores[i] for i in picked], picked, n_done, min(AGE_BINS, n_done), offset=start)
    reference = None
    if locality_reference is not None:
        reference = _locality_slices(requests, locality_reference, picked) if settings.sample is not None \
            else locality_reference
    tokens = token_scores(model, tok, cases, reference)
    out["locality_predictions"] = tokens.pop("locality_predictions")
    if not n_done and len(picked) < len(requests):    # the reference covers every scored case of the run
        out["locality_predictions"] = teacher_forced_argmax(model, tok, *locality_items(requests))
    out["edit_token"] = tokens
    controls = control_cases(settings)
    if controls:
        out["control"] = summarize(score_cases(model, tok, controls))
    out["general"] = {task: task_accuracy(model, tok, data, task, settings.glue_n)["accuracy"]
                      for task in settings.glue_tasks}
    if settings.glue_n is None:
        out["general_n"] = {task: len(load_task(data, task)) for task in settings.glue_tasks}
    if settings.ppl_tokens:
        out["general"]["perplexity"] = perplexity(model, tok, data / "wikitext-2" / "test.txt",
                                                  settings.ppl_tokens)["perplexity"]
    out["stability"] = {}
    for l in editor.cfg.layers:
        s = editor.spectrum(l)
        W = editor.arch.weight_view(model, l)
        s["dist_w0"] = float(torch.linalg.matrix_norm(W.double() - W0[l].to(W.device).double()))
        out["stability"][str(l)] = s
    out["seconds"] = time.perf_counter() - t
    return out


# --- the run ------------------------------------------------------------------------------------

def run_identity(model_name: str, cfg: MOSEConfig, settings: EvalSettings, requests: list[EditRequest]) -> dict:
    return {"model": model_name, "config": cfg.to_dict(), "settings": settings.to_dict(),
            "case_ids": [r.case_id for r in requests], "method": cfg.method}


def run_eval(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path,
             settings: EvalSettings | None = None, model_name: str = "", progress: bool = True,
             extend: bool = False, initial_eval_from: str | Path | None = None,
             statistics_file: str | Path | None = None) -> dict:
    """Sequential edits of ``requests`` in batches of ``settings.batch_size``, with an evaluation
    every ``settings.eval_every`` edits; resumable (see ``store``).

    ``extend``: the folder holds a run over a prefix of ``requests``; continue it to all of them.
    ``initial_eval_from``: a run folder of the same model, cases and evaluation settings whose
    pre-edit evaluation (identical for every method: the model is not edited yet) is reused."""
    settings = settings or EvalSettings()
    settings.validate()
    cfg.validate()
    editor = MOSEEditor(model, tok, cfg, progress=progress, data_dir=settings.data_dir, statistics_file=statistics_file)
    editor.validate(requests)
    control_cases(settings, [r.case_id for r in requests])      # refused before any edit where the run edits one
    folder = RunFolder(out_dir)
    identity = run_identity(model_name, cfg, settings, requests)
    folder.check_or_start(identity, extend)

    editor.prepare()       # statistics and templates from the unedited model, also when resuming
    if folder.read_identity().get("statistics_corpus") != editor.statistics_corpus_name:
        folder.note("statistics_corpus", editor.statistics_corpus_name)
    folder.save_w0({l: editor.arch.weight_view(model, l) for l in cfg.layers})
    W0 = folder.load_w0()
    state, n_done = folder.load_state(next(model.parameters()).device)
    if state is not None:
        editor.load_state_dict(state)
        folder.note_resume(n_done)
    journal = folder.journal(lambda e: e["index"] < n_done)
    evals = folder.evals(lambda e: e["n_edits"] <= n_done)
    if not evals:
        if initial_eval_from is not None:
            evals.append(_borrow_initial_eval(Path(initial_eval_from), identity, folder, W0))
        else:
            evals.append(evaluate(editor, requests, settings, W0, 0))
        # pre-edit argmax tokens on the locality prompts: the token protocol's locality reference
        folder.save_locality_ref(evals[-1]["locality_predictions"])
        folder.append_eval(evals[-1])
    locality_ref = folder.locality_ref()
    for e in evals:
        e.pop("locality_predictions", None)

    bs = settings.batch_size

    def due(n: int) -> bool:   # an evaluation point: every eval_every edits (or at eval_at), and the end
        if n == len(requests):
            return True
        if settings.eval_at is not None:
            return any(n - bs < p <= n for p in settings.eval_at)
        return n % settings.eval_every < bs

    def evaluate_now() -> None:
        last = journal[-1]["case_ids"] if journal else []
        evals.append(evaluate(editor, requests, settings, W0, n_done, locality_ref, last_batch=len(last)))
        evals[-1].pop("locality_predictions", None)
        folder.append_eval(evals[-1])

    # The state is saved before an evaluation: a run killed during one resumes at an evaluation
    # point with that evaluation missing.  Do it now, before editing on.
    if n_done and due(n_done) and evals[-1]["n_edits"] != n_done:
        evaluate_now()
    bar = tqdm(total=len(requests), initial=n_done, desc="sequential edits", unit="edit", disable=not progress)
    t_run = time.perf_counter()
    since_checkpoint = 0
    while n_done < len(requests):
        batch = requests[n_done:n_done + bs]
        rec = editor.edit(batch)
        # "index": the position of the batch's first case in the run (what resume, the landed windows
        # and the report count in); the editor's own record index counts edit calls, i.e. batches
        entry = {**rec.to_dict(), "index": n_done, "edit_call": rec.index, "case_ids": [r.case_id for r in batch],
                 "landed": rec.landed if rec.landed is not None else landed(editor.model, editor.tok, batch),
                 "rule_state_bytes": editor.rule_state_bytes()}
        if due(n_done + len(batch)) and editor.modules != ["mlp.down"]:
            # ‖W‖_F, σ_max, σ_min, κ₂ of every matrix the other modules rotate (the evaluation's
            # stability columns cover mlp.down), at the evaluation points
            entry["unit_spectra"] = editor.unit_spectra()
        folder.append_journal(entry)
        journal.append(entry)
        n_done += len(batch)
        since_checkpoint += 1
        last = n_done == len(requests)
        if last or due(n_done) or since_checkpoint >= settings.checkpoint_every:
            folder.save_state(editor.state_dict(), n_done)
            since_checkpoint = 0
        if due(n_done):
            evaluate_now()
        bar.update(len(batch))
    bar.close()
    report = build_report(identity, journal, evals, time.perf_counter() - t_run, folder.provenance())
    write_report(report, folder.path)
    return report


def _borrow_initial_eval(source: Path, identity: dict, folder: RunFolder, W0: dict[int, torch.Tensor]) -> dict:
    """Row 0 of another run over the same model, cases and evaluation settings (checked), recorded
    in this run's run.json as ``initial_eval_from``; its stability columns are this run's own
    layers, from their unedited matrices ``W0``."""
    theirs_folder = RunFolder(source)
    if not theirs_folder.exists():
        raise FileNotFoundError(f"initial_eval_from: {source} is not a run folder (no run.json)")
    theirs = theirs_folder.read_identity()
    rows = read_lines(source / "evals.jsonl", lambda e: e["n_edits"] == 0, rewrite=False)
    if not rows or "locality_predictions" not in rows[0]:
        raise ValueError(f"initial_eval_from: {source} has no pre-edit evaluation")
    # row 0 scored the source's first n cases (all of them, unless the source was extended since), or
    # with an evaluation sample, a sample of all its cases
    sampled = theirs.get("settings", {}).get("sample") is not None
    scored = theirs.get("case_ids", []) if sampled else theirs.get("case_ids", [])[:rows[0]["edit"]["n"]]
    differs = [k for k in ("model",) if theirs.get(k) != identity[k]]
    differs += ["case_ids"] if scored != identity["case_ids"] else []
    differs += [f"settings.{k}" for k in INITIAL_EVAL_SETTINGS
                if theirs.get("settings", {}).get(k) != identity["settings"].get(k)]
    if differs:
        raise ValueError(f"initial_eval_from: {source} evaluated something else ({', '.join(differs)} differ)")
    folder.note("initial_eval_from", {"folder": str(source), "commit": theirs.get("commit")})
    row = rows[0]
    row["stability"] = {str(l): {**spectrum(W), "dist_w0": 0.0} for l, W in sorted(W0.items())}
    return row


# --- short before/after run -----------------------------------------------------------------------

def run_sequential(model, tok, requests: list[EditRequest], cfg: MOSEConfig, out_dir: str | Path | None = None,
                   model_name: str = "", progress: bool = True, data_dir: str | Path | None = None,
                   statistics_file: str | Path | None = None) -> dict:
    """Scores before, len(requests) sequential edits, scores after, spectra, timing by stage."""
    editor = MOSEEditor(model, tok, cfg, progress=progress, data_dir=data_dir, statistics_file=statistics_file)
    before = score_cases(model, tok, requests)
    spectra_before = {l: editor.spectrum(l) for l in cfg.layers}
    t0 = time.perf_counter()
    records = editor.edit_sequential(requests)
    wall = time.perf_counter() - t0
    after = score_cases(model, tok, requests)
    spectra_after = {l: editor.spectrum(l) for l in cfg.layers}
    nb_delta = [statistics.mean(a.neighborhood_nll_true) - statistics.mean(b.neighborhood_nll_true)
                for a, b in zip(after, before) if a.neighborhood_nll_true]
    stages = ("targets", "keys", "solve", "apply", "total")
    report = {
        "model": model_name, "n_edits": len(requests), "batch_size": 1, "commit": git_commit(),
        "date": time.strftime("%F %T"), "machine": machine(), "config": cfg.to_dict(),
        "statistics_corpus": editor.statistics_corpus_name,
        "protocol": "probability comparison (MEMIT eval_utils_counterfact): mean-token NLL of ' '+answer",
        "before": summarize(before), "after": summarize(after),
        "neighborhood_nll_true_change": statistics.mean(nb_delta) if nb_delta else float("nan"),
        "stability": {str(l): {"fro_ratio": spectra_after[l]["fro"] / spectra_before[l]["fro"],
                               "kappa_ratio": spectra_after[l]["kappa"] / spectra_before[l]["kappa"],
                               "before": spectra_before[l], "after": spectra_after[l]} for l in cfg.layers},
        "seconds_per_edit": {s: statistics.mean(r.seconds[s] for r in records) for s in stages},
        "wall_seconds": wall, "setup_seconds": sum(r.seconds_setup for r in records),
        "max_orth_error": max(l.orth_error for r in records for l in r.layers),
        "cases": [{"case_id": b.case_id, "efficacy_before": b.efficacy, "efficacy_after": a.efficacy,
                   "paraphrase_after": a.paraphrase, "neighborhood_after": a.neighborhood,
                   "rewrite_nll_new": [b.rewrite_nll_new, a.rewrite_nll_new],
                   "rewrite_nll_true": [b.rewrite_nll_true, a.rewrite_nll_true]} for b, a in zip(before, after)],
        "records": [r.to_dict() for r in records],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "summary.md").write_text(before_after_summary(report))
    return report
